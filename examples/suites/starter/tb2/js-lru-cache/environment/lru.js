class LRUCache {
  constructor(capacity) {
    this.capacity = capacity;
  }
}

module.exports = { LRUCache };
