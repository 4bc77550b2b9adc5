//! The 12-digit national ID (citizen identification number): structure,
//! validation and construction.
//!
//! Layout: `PPP G YY NNNNNN` — province code of birth registration, a digit
//! for century and gender, the last two digits of the birth year, and six
//! random digits.

use std::fmt;

/// Province codes of birth registration (Circular 07/2016/TT-BCA, Annex 1),
/// with names. IDs keep these codes after the 2025 merger of provinces.
pub const PROVINCES: [(u16, &str); 63] = [
    (1, "Hà Nội"),
    (2, "Hà Giang"),
    (4, "Cao Bằng"),
    (6, "Bắc Kạn"),
    (8, "Tuyên Quang"),
    (10, "Lào Cai"),
    (11, "Điện Biên"),
    (12, "Lai Châu"),
    (14, "Sơn La"),
    (15, "Yên Bái"),
    (17, "Hòa Bình"),
    (19, "Thái Nguyên"),
    (20, "Lạng Sơn"),
    (22, "Quảng Ninh"),
    (24, "Bắc Giang"),
    (25, "Phú Thọ"),
    (26, "Vĩnh Phúc"),
    (27, "Bắc Ninh"),
    (30, "Hải Dương"),
    (31, "Hải Phòng"),
    (33, "Hưng Yên"),
    (34, "Thái Bình"),
    (35, "Hà Nam"),
    (36, "Nam Định"),
    (37, "Ninh Bình"),
    (38, "Thanh Hóa"),
    (40, "Nghệ An"),
    (42, "Hà Tĩnh"),
    (44, "Quảng Bình"),
    (45, "Quảng Trị"),
    (46, "Thừa Thiên Huế"),
    (48, "Đà Nẵng"),
    (49, "Quảng Nam"),
    (51, "Quảng Ngãi"),
    (52, "Bình Định"),
    (54, "Phú Yên"),
    (56, "Khánh Hòa"),
    (58, "Ninh Thuận"),
    (60, "Bình Thuận"),
    (62, "Kon Tum"),
    (64, "Gia Lai"),
    (66, "Đắk Lắk"),
    (67, "Đắk Nông"),
    (68, "Lâm Đồng"),
    (70, "Bình Phước"),
    (72, "Tây Ninh"),
    (74, "Bình Dương"),
    (75, "Đồng Nai"),
    (77, "Bà Rịa - Vũng Tàu"),
    (79, "Hồ Chí Minh"),
    (80, "Long An"),
    (82, "Tiền Giang"),
    (83, "Bến Tre"),
    (84, "Trà Vinh"),
    (86, "Vĩnh Long"),
    (87, "Đồng Tháp"),
    (89, "An Giang"),
    (91, "Kiên Giang"),
    (92, "Cần Thơ"),
    (93, "Hậu Giang"),
    (94, "Sóc Trăng"),
    (95, "Bạc Liêu"),
    (96, "Cà Mau"),
];

/// Name of a province code of birth registration, if the code is official.
pub fn province_name(code: u16) -> Option<&'static str> {
    PROVINCES
        .binary_search_by_key(&code, |(c, _)| *c)
        .ok()
        .map(|i| PROVINCES[i].1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gender {
    Male,
    Female,
}

/// A structurally valid national ID, split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NationalId {
    pub province: u16,
    pub gender: Gender,
    /// Full birth year (1900–2399).
    pub birth_year: u16,
    /// The six random digits.
    pub serial: u32,
}

/// Why a string is not a valid national ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NationalIdError {
    #[error("national ID must be 12 digits, got {0} characters")]
    Length(usize),
    #[error("national ID must contain only digits")]
    NotDigits,
    #[error("province code {0:03} is not an official code of birth registration")]
    UnknownProvince(u16),
    #[error("birth year {0} is outside 1900–2399")]
    YearOutOfRange(u16),
    #[error("serial {0} does not fit in six digits")]
    SerialOutOfRange(u32),
}

impl NationalId {
    /// Builds an ID from its parts, checking each.
    pub fn new(
        province: u16,
        gender: Gender,
        birth_year: u16,
        serial: u32,
    ) -> Result<Self, NationalIdError> {
        if province_name(province).is_none() {
            return Err(NationalIdError::UnknownProvince(province));
        }
        if !(1900..=2399).contains(&birth_year) {
            return Err(NationalIdError::YearOutOfRange(birth_year));
        }
        if serial > 999_999 {
            return Err(NationalIdError::SerialOutOfRange(serial));
        }
        Ok(NationalId {
            province,
            gender,
            birth_year,
            serial,
        })
    }

    /// Parses and validates the 12-digit form.
    pub fn parse(text: &str) -> Result<Self, NationalIdError> {
        if text.len() != 12 {
            return Err(NationalIdError::Length(text.chars().count()));
        }
        if !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(NationalIdError::NotDigits);
        }
        let digits: Vec<u32> = text.bytes().map(|b| u32::from(b - b'0')).collect();
        let number =
            |range: std::ops::Range<usize>| digits[range].iter().fold(0u32, |acc, d| acc * 10 + d);
        let province = number(0..3) as u16;
        if province_name(province).is_none() {
            return Err(NationalIdError::UnknownProvince(province));
        }
        let century_gender = digits[3];
        let century = 1900 + 100 * (century_gender / 2) as u16;
        let gender = if century_gender.is_multiple_of(2) {
            Gender::Male
        } else {
            Gender::Female
        };
        Ok(NationalId {
            province,
            gender,
            birth_year: century + number(4..6) as u16,
            serial: number(6..12),
        })
    }

    /// The century/gender digit (0–9).
    pub fn century_gender_digit(&self) -> u16 {
        let century_index = (self.birth_year - 1900) / 100;
        century_index * 2 + u16::from(self.gender == Gender::Female)
    }
}

impl fmt::Display for NationalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:03}{}{:02}{:06}",
            self.province,
            self.century_gender_digit(),
            self.birth_year % 100,
            self.serial
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_known_examples() {
        let id = NationalId::parse("001089123456").expect("valid");
        assert_eq!(id.province, 1);
        assert_eq!(id.gender, Gender::Male);
        assert_eq!(id.birth_year, 1989);
        assert_eq!(id.serial, 123_456);
        let id = NationalId::parse("079305000001").expect("valid");
        assert_eq!(
            (id.province, id.gender, id.birth_year),
            (79, Gender::Female, 2005)
        );
    }

    #[test]
    fn rejects_invalid_ids() {
        assert_eq!(
            NationalId::parse("00108912345"),
            Err(NationalIdError::Length(11))
        );
        assert_eq!(
            NationalId::parse("00108912345a"),
            Err(NationalIdError::NotDigits)
        );
        assert_eq!(
            NationalId::parse("003089123456"),
            Err(NationalIdError::UnknownProvince(3))
        );
        assert_eq!(
            NationalId::parse("097089123456"),
            Err(NationalIdError::UnknownProvince(97))
        );
    }

    #[test]
    fn provinces_are_sorted_for_lookup() {
        assert!(PROVINCES.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(province_name(79), Some("Hồ Chí Minh"));
    }

    proptest! {
        #[test]
        fn display_and_parse_round_trip(
            p in 0usize..63, female in any::<bool>(), year in 1900u16..2400, serial in 0u32..1_000_000
        ) {
            let gender = if female { Gender::Female } else { Gender::Male };
            let id = NationalId::new(PROVINCES[p].0, gender, year, serial).expect("valid parts");
            let text = id.to_string();
            prop_assert_eq!(text.len(), 12);
            prop_assert_eq!(NationalId::parse(&text), Ok(id));
        }
    }
}
