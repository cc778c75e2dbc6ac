#[path = "/app/brackets.rs"]
mod brackets;

#[test]
fn accepts_balanced() {
    assert!(brackets::balanced(""));
    assert!(brackets::balanced("fn main() { let v = [1, (2)]; }"));
}

#[test]
fn rejects_unbalanced() {
    assert!(!brackets::balanced("(]"));
    assert!(!brackets::balanced("([)]"));
    assert!(!brackets::balanced("{"));
}
