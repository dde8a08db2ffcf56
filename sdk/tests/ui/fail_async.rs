use weir_sdk::{Output, Record, TransformError};

#[weir_sdk::transform]
async fn later(record: Record) -> Result<Output, TransformError> {
    Ok(Output::new(record.value))
}

fn main() {}
