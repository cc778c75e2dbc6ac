import test from "node:test";
import assert from "node:assert";
import { flatten } from "/app/flatten.mjs";

test("nested keys become dotted paths", () => {
  assert.deepStrictEqual(flatten({ a: { b: 1, c: { d: "x" } }, e: 2 }), { "a.b": 1, "a.c.d": "x", e: 2 });
});

test("arrays are leaves, empty objects vanish", () => {
  assert.deepStrictEqual(flatten({ a: [1, { b: 2 }], c: {} }), { a: [1, { b: 2 }] });
});
