//! The Debezium decoder (and the repartition topic's fact decoder, and the
//! national-ID check) never panics, and what it accepts is consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ndc_operators::debezium::{
    ChangeOp, Decoded, Decoder, DecoderConfig, Format, Key, NationalIdCheck,
};
use ndc_operators::national_id::NationalId;

fuzz_target!(|data: &[u8]| {
    // First byte: format, key columns, topic kind, whether there is a key.
    let Some((&ctl, rest)) = data.split_first() else { return };
    let format = match (ctl & 1, ctl & 128) {
        (_, 128) => Format::Facts,
        (0, _) => Format::Debezium,
        _ => Format::Flattened,
    };
    // Bit 6: check national IDs in column `id` against `born` and `sex`.
    let national_id = (ctl & 64 != 0).then(|| NationalIdCheck {
        column: "id".into(),
        birth_date_column: Some("born".into()),
        gender_column: Some("sex".into()),
        required: true,
    });
    let key_columns = if ctl & 2 == 0 { vec![] } else { vec!["id".to_string()] };
    let topic = match (ctl >> 2) & 3 {
        0 => "agency.public.t",
        1 => "__debezium-heartbeat.agency",
        2 => "agency.transaction",
        _ => "",
    };
    let split = rest.iter().position(|b| *b == 0xff).unwrap_or(0);
    let (key, value) = rest.split_at(split);
    let key = (ctl & 16 != 0).then_some(key);
    let value = if ctl & 32 != 0 { None } else { Some(value.get(1..).unwrap_or(value)) };
    let checked = national_id.is_some();
    let decoder = Decoder::new(DecoderConfig { format, key_columns, max_record_bytes: 4096, national_id });
    let decoded = decoder.decode(topic, key, value);
    if let Ok(Decoded::Fact(f)) = &decoded {
        // Facts are accepted only with a valid national ID.
        NationalId::parse(&f.national_id).expect("fact with a valid national ID");
    }
    if let Ok(Decoded::Change(c)) = decoded {
        if checked && let Some(after) = &c.after {
            let row = after.to_value();
            let id = row
                .get("id")
                .and_then(ndc_operators::merge::national_id_text)
                .expect("checked rows have an id");
            NationalId::parse(&id).expect("checked rows have a valid national ID");
        }
        match c.op {
            ChangeOp::Truncate => assert!(c.key.is_none()),
            _ => {
                let k = c.key.expect("keyed change");
                // Canonical keys are a fixed point of parsing.
                assert_eq!(Key::parse(k.as_str()).expect("canonical key parses"), k);
            }
        }
        if c.op == ChangeOp::Delete {
            assert!(c.after.is_none());
        }
    }
});
