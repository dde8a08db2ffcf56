use weir_sdk::Record;

#[weir_sdk::transform]
fn text(record: Record) -> Result<String, String> {
    Ok(String::from_utf8_lossy(&record.value).into_owned())
}

fn main() {}
