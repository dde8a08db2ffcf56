use weir_sdk::{Output, Record, TransformError};

#[weir_sdk::transform(retries = 3)]
fn shout(record: Record) -> Result<Output, TransformError> {
    Ok(Output::new(record.value))
}

fn main() {}
