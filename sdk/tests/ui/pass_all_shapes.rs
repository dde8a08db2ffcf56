use weir_sdk::{Config, Output, Record, TransformError};

fn check(config: &Config) -> Result<(), String> {
    config.get("x").map(|_| ()).ok_or_else(|| "x is required".to_string())
}

#[weir_sdk::transform(init = check)]
fn fan_out(record: Record) -> Result<Vec<Output>, TransformError> {
    Ok(vec![Output::new(record.value.clone()), Output::to("other", record.value).with_key("k")])
}

fn main() {}
