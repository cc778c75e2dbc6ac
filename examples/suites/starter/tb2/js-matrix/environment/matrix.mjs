export function transpose(m) {
  return m.map((row, i) => row.map((_, j) => m[j][i]));
}

export function multiply(a, b) {
  return a.map((row, i) => row.map((_, j) => row.reduce((s, x, k) => s + x * b[k][j], 0)));
}
