//! Synthetic agency feeds: realistic Debezium change events of a population
//! registry (`population.public.citizens`), a residence registry
//! (`residence.public.addresses`), health insurance
//! (`health.public.insurance_cards`), vehicle registration
//! (`vehicles.public.vehicles`) and business registration
//! (`business.public.registrations`), for the quickstart, tests and load
//! tests.
//!
//! Deterministic: person `i` always has the same national ID, and revision
//! `r` of a row always has the same content, so a test can compute the
//! expected replica without keeping the feed in memory.

use ndc_operators::national_id::{Gender, NationalId, PROVINCES};
use serde_json::{Value, json};

/// Small, fast, seedable PRNG (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const FAMILY: [&str; 16] = [
    "Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng", "Bùi", "Đỗ",
    "Hồ", "Ngô", "Dương", "Lý",
];
const MIDDLE_MALE: [&str; 6] = ["Văn", "Hữu", "Đức", "Minh", "Quang", "Công"];
const MIDDLE_FEMALE: [&str; 6] = ["Thị", "Ngọc", "Thanh", "Thu", "Kim", "Mỹ"];
const GIVEN_MALE: [&str; 12] = [
    "An", "Bình", "Dũng", "Hải", "Hùng", "Khánh", "Long", "Nam", "Phong", "Quân", "Sơn", "Tuấn",
];
const GIVEN_FEMALE: [&str; 12] = [
    "Châu", "Giang", "Hà", "Hạnh", "Hương", "Lan", "Linh", "Mai", "Nga", "Thảo", "Trang", "Vy",
];
const OCCUPATIONS: [&str; 8] = [
    "teacher",
    "farmer",
    "engineer",
    "nurse",
    "trader",
    "civil servant",
    "student",
    "retired",
];
const MARITAL: [&str; 4] = ["single", "married", "divorced", "widowed"];
const STREETS: [&str; 8] = [
    "Lê Lợi",
    "Trần Hưng Đạo",
    "Nguyễn Huệ",
    "Hai Bà Trưng",
    "Lý Thường Kiệt",
    "Điện Biên Phủ",
    "Phan Chu Trinh",
    "Hùng Vương",
];

/// The national ID of synthetic person `i` (unique for `i < 63_000_000`).
pub fn national_id(i: u64) -> NationalId {
    let h = mix(i ^ 0x5EED);
    let serial = (i % 1_000_000) as u32;
    let block = i / 1_000_000;
    let province = PROVINCES[((block + u64::from(serial) * 7) % 63) as usize].0;
    let gender = if h & 1 == 0 {
        Gender::Male
    } else {
        Gender::Female
    };
    let birth_year = 1940 + ((h >> 8) % 84) as u16;
    NationalId {
        province,
        gender,
        birth_year,
        serial,
    }
}

/// Row `revision` of person `i` in the population registry.
pub fn citizen_row(i: u64, revision: u32) -> Value {
    let id = national_id(i);
    let h = mix(i);
    let female = id.gender == Gender::Female;
    let pick =
        |list: &[&'static str], salt: u64| list[(mix(h ^ salt) % list.len() as u64) as usize];
    let name = format!(
        "{} {} {}",
        pick(&FAMILY, 1),
        if female {
            pick(&MIDDLE_FEMALE, 2)
        } else {
            pick(&MIDDLE_MALE, 2)
        },
        if female {
            pick(&GIVEN_FEMALE, 3)
        } else {
            pick(&GIVEN_MALE, 3)
        }
    );
    let r = u64::from(revision);
    json!({
        "person_id": id.to_string(),
        "full_name": name,
        "gender": if female { "female" } else { "male" },
        "birth_date": format!("{}-{:02}-{:02}", id.birth_year, 1 + (h >> 16) % 12, 1 + (h >> 24) % 28),
        "birth_province_code": format!("{:03}", id.province),
        "ethnicity": "Kinh",
        "nationality": "VN",
        "marital_status": MARITAL[((h >> 32).wrapping_add(r) % 4) as usize],
        "occupation": OCCUPATIONS[((h >> 40).wrapping_add(r) % 8) as usize],
        "phone": format!("09{:08}", mix(h ^ r) % 100_000_000),
        "revision": revision,
    })
}

/// Row `revision` of the residence of person `i`.
pub fn address_row(i: u64, revision: u32) -> Value {
    let h = mix(i ^ 0xADD);
    let r = u64::from(revision);
    let province = PROVINCES[((h.wrapping_add(r)) % 63) as usize];
    json!({
        "address_id": i + 1,
        "person_id": national_id(i).to_string(),
        "province_code": format!("{:03}", province.0),
        "province_name": province.1,
        "street": STREETS[((h >> 8).wrapping_add(r) % 8) as usize],
        "house_no": format!("{}", 1 + (mix(h ^ r) % 300)),
        "residence_type": if (h >> 20).wrapping_add(r) % 5 == 0 { "temporary" } else { "permanent" },
        "revision": revision,
    })
}

/// Row `revision` of health-insurance card `i` (held by person `i`). Every
/// seventh card spells the holder's name its own way (no diacritics), and
/// every thirteenth records a birth date one year off: the disagreements a
/// golden record has to surface as conflicts.
pub fn insurance_card_row(i: u64, revision: u32) -> Value {
    let citizen = citizen_row(i, 0);
    let id = national_id(i);
    let h = mix(i ^ 0xCA2D);
    let r = u64::from(revision);
    let name = citizen["full_name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let holder_name = if i % 7 == 3 {
        strip_diacritics(&name)
    } else {
        name
    };
    let birth_date = citizen["birth_date"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let birth_date = if i % 13 == 5 {
        format!("{}{}", id.birth_year + 1, &birth_date[4..])
    } else {
        birth_date
    };
    json!({
        "card_no": format!("HC{}{:010}", 4 + (h % 5), i),
        "person_id": id.to_string(),
        "holder_name": holder_name,
        "birth_date": birth_date,
        "mobile": format!("08{:08}", mix(h ^ r) % 100_000_000),
        "hospital_code": format!("{:03}-{:03}", id.province, (h >> 12) % 200),
        "valid_to": format!("{}-12-31", 2026 + (r % 3)),
        "revision": revision,
    })
}

/// Row `revision` of vehicle `i`, owned by person `i / 2 * 2` (some people
/// own two) — or, from revision 2 on for every fifth vehicle, sold to the
/// next person.
pub fn vehicle_row(i: u64, revision: u32) -> Value {
    const MAKES: [(&str, &str); 5] = [
        ("VinFast", "VF 8"),
        ("Toyota", "Vios"),
        ("Honda", "City"),
        ("Hyundai", "Accent"),
        ("Kia", "Morning"),
    ];
    const COLORS: [&str; 5] = ["white", "black", "silver", "red", "blue"];
    let h = mix(i ^ 0x7E11);
    let owner = if revision >= 2 && i.is_multiple_of(5) {
        i / 2 * 2 + 1
    } else {
        i / 2 * 2
    };
    let (make, model) = MAKES[(h % 5) as usize];
    json!({
        "plate": format!("{:02}A-{:05}", national_id(i).province % 100, i % 100_000),
        "owner_id": national_id(owner).to_string(),
        "make": make,
        "model": model,
        "year": 2010 + (h >> 8) % 16,
        "color": COLORS[((h >> 16).wrapping_add(u64::from(revision)) % 5) as usize],
        "revision": revision,
    })
}

/// Row `revision` of business registration `i`, whose legal representative
/// is person `3i + 1`.
pub fn business_row(i: u64, revision: u32) -> Value {
    const KINDS: [&str; 4] = [
        "Công ty TNHH",
        "Công ty Cổ phần",
        "Doanh nghiệp tư nhân",
        "Hợp tác xã",
    ];
    const TRADES: [&str; 6] = [
        "Thương mại",
        "Xây dựng",
        "Nông sản",
        "Vận tải",
        "Công nghệ",
        "Du lịch",
    ];
    const INDUSTRIES: [&str; 6] = ["4690", "4100", "0111", "4933", "6201", "7911"];
    let h = mix(i ^ 0xB125);
    let trade = (h % 6) as usize;
    let rep = national_id(3 * i + 1);
    json!({
        "business_code": format!("{:010}", 100_000_000 + i),
        "name": format!("{} {} {}", KINDS[((h >> 8) % 4) as usize], TRADES[trade], FAMILY[((h >> 16) % 16) as usize]),
        "legal_rep_id": rep.to_string(),
        "industry_code": INDUSTRIES[trade],
        "province_code": format!("{:03}", rep.province),
        "status": if revision % 5 == 4 { "suspended" } else { "active" },
        "registered_on": format!("{}-{:02}-01", 2005 + (h >> 24) % 20, 1 + (h >> 32) % 12),
        "revision": revision,
    })
}

/// Vietnamese letters without their diacritics (how some systems store names).
fn strip_diacritics(text: &str) -> String {
    const GROUPS: [(&str, char); 14] = [
        ("àáảãạăằắẳẵặâầấẩẫậ", 'a'),
        ("ÀÁẢÃẠĂẰẮẲẴẶÂẦẤẨẪẬ", 'A'),
        ("èéẻẽẹêềếểễệ", 'e'),
        ("ÈÉẺẼẸÊỀẾỂỄỆ", 'E'),
        ("ìíỉĩị", 'i'),
        ("ÌÍỈĨỊ", 'I'),
        ("òóỏõọôồốổỗộơờớởỡợ", 'o'),
        ("ÒÓỎÕỌÔỒỐỔỖỘƠỜỚỞỠỢ", 'O'),
        ("ùúủũụưừứửữự", 'u'),
        ("ÙÚỦŨỤƯỪỨỬỮỰ", 'U'),
        ("ỳýỷỹỵ", 'y'),
        ("ỲÝỶỸỴ", 'Y'),
        ("đ", 'd'),
        ("Đ", 'D'),
    ];
    text.chars()
        .map(|c| {
            GROUPS
                .iter()
                .find(|(g, _)| g.contains(c))
                .map_or(c, |(_, plain)| *plain)
        })
        .collect()
}

/// Which registry a feed imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Citizens,
    Addresses,
    InsuranceCards,
    Vehicles,
    Businesses,
}

impl Table {
    pub fn topic(self) -> &'static str {
        match self {
            Table::Citizens => "population.public.citizens",
            Table::Addresses => "residence.public.addresses",
            Table::InsuranceCards => "health.public.insurance_cards",
            Table::Vehicles => "vehicles.public.vehicles",
            Table::Businesses => "business.public.registrations",
        }
    }

    pub fn row(self, i: u64, revision: u32) -> Value {
        match self {
            Table::Citizens => citizen_row(i, revision),
            Table::Addresses => address_row(i, revision),
            Table::InsuranceCards => insurance_card_row(i, revision),
            Table::Vehicles => vehicle_row(i, revision),
            Table::Businesses => business_row(i, revision),
        }
    }

    /// The Kafka message key Debezium writes (primary-key columns).
    pub fn key(self, i: u64) -> Value {
        match self {
            Table::Citizens => json!({ "person_id": national_id(i).to_string() }),
            Table::Addresses => json!({ "address_id": i + 1 }),
            Table::InsuranceCards => json!({ "card_no": insurance_card_row(i, 0)["card_no"] }),
            Table::Vehicles => json!({ "plate": vehicle_row(i, 0)["plate"] }),
            Table::Businesses => json!({ "business_code": business_row(i, 0)["business_code"] }),
        }
    }

    fn source(self, lsn: u64, ts_ms: i64, tx_id: u64, snapshot: &str) -> Value {
        let (db, table) = match self {
            Table::Citizens => ("population", "citizens"),
            Table::Addresses => ("residence", "addresses"),
            Table::InsuranceCards => ("health", "insurance_cards"),
            Table::Vehicles => ("vehicles", "vehicles"),
            Table::Businesses => ("business", "registrations"),
        };
        json!({
            "version": "2.7.3.Final", "connector": "postgresql", "name": db, "ts_ms": ts_ms,
            "snapshot": snapshot, "db": db, "sequence": format!("[\"{}\",\"{}\"]", lsn.saturating_sub(8), lsn),
            "schema": "public", "table": table, "txId": tx_id, "lsn": lsn, "xmin": null
        })
    }
}

/// A stream of change events for one table, with increasing LSNs and
/// commit times, as one agency database would produce them.
#[derive(Debug, Clone)]
pub struct Feed {
    pub table: Table,
    pub lsn: u64,
    pub ts_ms: i64,
    tx_id: u64,
}

/// One change event as bytes, ready to publish.
#[derive(Debug, Clone)]
pub struct Event {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

impl Feed {
    pub fn new(table: Table, start_ts_ms: i64) -> Self {
        Feed {
            table,
            lsn: 24_000_000,
            ts_ms: start_ts_ms,
            tx_id: 500,
        }
    }

    fn advance(&mut self, now_ms: Option<i64>) {
        self.lsn += 64;
        self.tx_id += 1;
        self.ts_ms = match now_ms {
            Some(now) => now.max(self.ts_ms),
            None => self.ts_ms + 1,
        };
    }

    /// `op` is `c`, `u`, `d` or `r`. `revision` picks the row content (the
    /// previous revision is the `before`). `now_ms` stamps the commit time
    /// (None: previous + 1 ms, for deterministic tests).
    pub fn event(&mut self, op: char, i: u64, revision: u32, now_ms: Option<i64>) -> Event {
        self.advance(now_ms);
        let (before, after) = match op {
            'c' | 'r' => (Value::Null, self.table.row(i, revision)),
            'u' => (
                self.table.row(i, revision.saturating_sub(1)),
                self.table.row(i, revision),
            ),
            _ => (self.table.row(i, revision), Value::Null),
        };
        let snapshot = if op == 'r' { "true" } else { "false" };
        let value = json!({
            "before": before,
            "after": after,
            "source": self.table.source(self.lsn, self.ts_ms, self.tx_id, snapshot),
            "op": op.to_string(),
            "ts_ms": self.ts_ms + 3,
            "transaction": null,
        });
        Event {
            key: self.table.key(i).to_string().into_bytes(),
            value: Some(value.to_string().into_bytes()),
        }
    }

    /// The tombstone Debezium writes after a delete.
    pub fn tombstone(&self, i: u64) -> Event {
        Event {
            key: self.table.key(i).to_string().into_bytes(),
            value: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn national_ids_are_valid_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for i in (0..3_000_000).step_by(997).chain(0..2000) {
            let id = national_id(i);
            let text = id.to_string();
            assert_eq!(NationalId::parse(&text), Ok(id), "{text}");
            seen.insert((i, text));
        }
        let ids: std::collections::HashSet<_> = seen.iter().map(|(_, t)| t.clone()).collect();
        assert_eq!(ids.len(), seen.len());
    }

    #[test]
    fn events_decode_as_debezium() {
        let mut feed = Feed::new(Table::Citizens, 1_700_000_000_000);
        let e = feed.event('u', 42, 3, None);
        let d = ndc_operators::Decoder::new(Default::default());
        let decoded = d
            .decode(Table::Citizens.topic(), Some(&e.key), e.value.as_deref())
            .expect("decodes");
        match decoded {
            ndc_operators::Decoded::Change(c) => {
                assert_eq!(c.op, ndc_operators::ChangeOp::Update);
                assert_eq!(c.source.lsn, Some(feed.lsn));
                assert_eq!(c.after.map(|r| r.to_value()), Some(citizen_row(42, 3)));
            }
            other => panic!("not a change: {other:?}"),
        }
    }
}
