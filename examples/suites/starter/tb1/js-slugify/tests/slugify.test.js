const test = require("node:test");
const assert = require("node:assert");
const { slugify } = require("/app/slugify.js");

test("basic words", () => {
  assert.strictEqual(slugify("Hello, World!"), "hello-world");
});

test("runs collapse and edges trim", () => {
  assert.strictEqual(slugify("  --Lagoon   eval__harness--  "), "lagoon-eval-harness");
});

test("accents are removed", () => {
  assert.strictEqual(slugify("Crème Brûlée"), "creme-brulee");
});
