export function flatten(obj) {
  return obj;
}
