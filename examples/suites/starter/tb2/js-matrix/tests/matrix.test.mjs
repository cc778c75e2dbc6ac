import test from "node:test";
import assert from "node:assert";
import { transpose, multiply } from "/app/matrix.mjs";

test("transpose of a 2x3", () => {
  assert.deepStrictEqual(transpose([[1, 2, 3], [4, 5, 6]]), [[1, 4], [2, 5], [3, 6]]);
});

test("multiply 2x3 by 3x1", () => {
  assert.deepStrictEqual(multiply([[1, 2, 3], [4, 5, 6]], [[1], [0], [2]]), [[7], [16]]);
});

test("shape mismatch throws", () => {
  assert.throws(() => multiply([[1, 2]], [[1, 2]]));
});
