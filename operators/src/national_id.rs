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
    #[error(
        "the ID says born in {id_year} (century/gender and year digits), the record says {record_year}"
    )]
    BirthYearMismatch { id_year: u16, record_year: i64 },
    #[error("the ID's century/gender digit says {id:?}, the record says {record:?}")]
    GenderMismatch { id: Gender, record: Gender },
    #[error("birth date {0} is not a date (YYYY-MM-DD or days since 1970-01-01)")]
    BadBirthDate(String),
}

impl NationalIdError {
    /// Short label for metrics and dead-letter headers; never changes.
    pub fn label(&self) -> &'static str {
        match self {
            NationalIdError::Length(_) => "length",
            NationalIdError::NotDigits => "not_digits",
            NationalIdError::UnknownProvince(_) => "unknown_province",
            NationalIdError::YearOutOfRange(_) => "year_out_of_range",
            NationalIdError::SerialOutOfRange(_) => "serial_out_of_range",
            NationalIdError::BirthYearMismatch { .. } => "birth_year_mismatch",
            NationalIdError::GenderMismatch { .. } => "gender_mismatch",
            NationalIdError::BadBirthDate(_) => "bad_birth_date",
        }
    }
}

/// Year of a birth date as agencies send it: `YYYY-MM-DD…` text, or an
/// integer — days since 1970-01-01 (Debezium's `io.debezium.time.Date`), or
/// milliseconds since the epoch when too large to be days.
pub fn birth_year_of(value: &serde_json::Value) -> Result<Option<i64>, NationalIdError> {
    use serde_json::Value;
    let bad = || NationalIdError::BadBirthDate(value.to_string());
    match value {
        Value::Null => Ok(None),
        Value::String(s) => {
            let year = s.get(..4).filter(|y| y.bytes().all(|b| b.is_ascii_digit()));
            let dash = s.as_bytes().get(4).is_none_or(|b| *b == b'-');
            match (year, dash) {
                (Some(y), true) => y.parse().map(Some).map_err(|_| bad()),
                _ => Err(bad()),
            }
        }
        Value::Number(n) => {
            let n = n.as_i64().ok_or_else(bad)?;
            let days = if n.abs() <= 200_000 {
                n
            } else {
                n.div_euclid(86_400_000)
            };
            Ok(Some(year_of_days(days)))
        }
        _ => Err(bad()),
    }
}

/// Civil year of a day count since 1970-01-01 (proleptic Gregorian).
fn year_of_days(days: i64) -> i64 {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    yoe + era * 400 + i64::from(month <= 2)
}

/// Gender of a record's gender column, if recognised (`M`/`F`, `male`,
/// `female`, `nam`, `nữ`; case-insensitive). Other values are not checked.
pub fn gender_of(value: &serde_json::Value) -> Option<Gender> {
    let text = value.as_str()?.trim().to_lowercase();
    match text.as_str() {
        "m" | "male" | "nam" => Some(Gender::Male),
        "f" | "female" | "nu" | "nữ" => Some(Gender::Female),
        _ => None,
    }
}

/// Validates a record's national ID and its consistency with the record's
/// birth date and gender, where the record has them.
pub fn check_record(
    text: &str,
    birth_date: Option<&serde_json::Value>,
    gender: Option<&serde_json::Value>,
) -> Result<NationalId, NationalIdError> {
    let id = NationalId::parse(text)?;
    if let Some(year) = birth_date.map(birth_year_of).transpose()?.flatten()
        && year != i64::from(id.birth_year)
    {
        return Err(NationalIdError::BirthYearMismatch {
            id_year: id.birth_year,
            record_year: year,
        });
    }
    if let Some(record) = gender.and_then(gender_of)
        && record != id.gender
    {
        return Err(NationalIdError::GenderMismatch {
            id: id.gender,
            record,
        });
    }
    Ok(id)
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

    #[test]
    fn checks_consistency_with_the_record() {
        use serde_json::json;
        let ok = check_record(
            "001089123456",
            Some(&json!("1989-04-30")),
            Some(&json!("M")),
        );
        assert!(ok.is_ok());
        // Debezium's date as days since the epoch: 1989-04-30 is day 7059.
        assert!(check_record("001089123456", Some(&json!(7059)), Some(&json!("nam"))).is_ok());
        assert_eq!(
            check_record("001089123456", Some(&json!("1990-01-01")), None),
            Err(NationalIdError::BirthYearMismatch {
                id_year: 1989,
                record_year: 1990
            })
        );
        // Digit 4 = 2: a man born in the 2000s, not 1989.
        assert_eq!(
            check_record("001289123456", Some(&json!("1989-04-30")), None).map_err(|e| e.label()),
            Err("birth_year_mismatch")
        );
        assert_eq!(
            check_record("001089123456", None, Some(&json!("Nữ"))),
            Err(NationalIdError::GenderMismatch {
                id: Gender::Male,
                record: Gender::Female
            })
        );
        assert_eq!(
            check_record("001089123456", Some(&json!("30/04/1989")), None).map_err(|e| e.label()),
            Err("bad_birth_date")
        );
        // Unrecognised gender codes and null dates are not checked.
        assert!(check_record("001089123456", Some(&json!(null)), Some(&json!("X"))).is_ok());
    }

    proptest! {
        #[test]
        fn year_of_days_matches_the_calendar(days in -80_000i64..200_000) {
            // Reference: walk whole years from 1970.
            let (mut year, mut left) = (1970i64, days);
            let len = |y: i64| if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 { 366 } else { 365 };
            while left < 0 { year -= 1; left += len(year); }
            while left >= len(year) { left -= len(year); year += 1; }
            prop_assert_eq!(year_of_days(days), year);
        }

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
