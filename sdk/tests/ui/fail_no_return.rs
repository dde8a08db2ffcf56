use weir_sdk::Record;

#[weir_sdk::transform]
fn nothing(record: Record) {
    let _ = record;
}

fn main() {}
