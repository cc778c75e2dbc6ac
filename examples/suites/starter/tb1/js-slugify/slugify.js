function slugify(text) {
  throw new Error("not implemented");
}

module.exports = { slugify };
