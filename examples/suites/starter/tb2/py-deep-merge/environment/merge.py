def deep_merge(base, override):
    base.update(override)
    return base
