#[path = "/app/roman.rs"]
mod roman;

#[test]
fn small_numbers() {
    assert_eq!(roman::to_roman(1), "I");
    assert_eq!(roman::to_roman(4), "IV");
    assert_eq!(roman::to_roman(9), "IX");
    assert_eq!(roman::to_roman(14), "XIV");
}

#[test]
fn large_numbers() {
    assert_eq!(roman::to_roman(1994), "MCMXCIV");
    assert_eq!(roman::to_roman(3999), "MMMCMXCIX");
}
