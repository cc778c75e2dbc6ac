pub fn to_roman(n: u32) -> String {
    let _ = n;
    String::new()
}
