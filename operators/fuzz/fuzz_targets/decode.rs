//! The Debezium decoder never panics, and what it accepts is consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ndc_operators::debezium::{ChangeOp, Decoded, Decoder, DecoderConfig, Format, Key};

fuzz_target!(|data: &[u8]| {
    // First byte: format, key columns, topic kind, whether there is a key.
    let Some((&ctl, rest)) = data.split_first() else { return };
    let format = if ctl & 1 == 0 { Format::Debezium } else { Format::Flattened };
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
    let decoder = Decoder::new(DecoderConfig { format, key_columns, max_record_bytes: 4096, national_id: None });
    if let Ok(Decoded::Change(c)) = decoder.decode(topic, key, value) {
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
