use weir_sdk::{Output, Record, TransformError};

#[weir_sdk::transform]
fn two(record: Record, extra: u32) -> Result<Output, TransformError> {
    let _ = extra;
    Ok(Output::new(record.value))
}

fn main() {}
