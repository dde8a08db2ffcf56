//! How an error is shown: what failed, then each cause once.
//!
//! Every error type of the crate says what failed in its message and keeps the cause as its
//! `source` (never both), so printing the chain is what shows the whole story: the CLI does it
//! with anyhow's `{:#}`, logs and API responses with [`chain`].

use std::error::Error;

/// `e` and its causes, joined with ": ".
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open input x")]
    struct Open(#[source] std::io::Error);

    #[test]
    fn each_cause_is_said_once_in_order() {
        let e = Open(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such file",
        ));
        assert_eq!(chain(&e), "cannot open input x: no such file");
    }
}
