//! The hook example from the README, kept here so that it always compiles:
//! `cargo run --example tagger` serves the shipped `config.toml` with it.

use mailer::hooks::{DataVerdict, Envelope, Header, Hooks, SessionInfo};
use mailer::protocol::address::Address;
use mailer::{Config, Enhanced, Reply, Server};

struct Tagger;

impl Hooks for Tagger {
    fn rcpt(&self, _: &SessionInfo, _: &Envelope, to: &Address) -> Result<(), Reply> {
        if to.local_part().eq_ignore_ascii_case("nobody") {
            return Err(Reply::new(550, Enhanced(5, 1, 1), "No such user here"));
        }
        Ok(())
    }
    fn wants_data(&self) -> bool {
        true
    }
    fn data(
        &self,
        _: &SessionInfo,
        _: &Envelope,
        content: &mut dyn std::io::Read,
    ) -> Result<DataVerdict, Reply> {
        let size = std::io::copy(content, &mut std::io::sink()).unwrap_or(0);
        Ok(DataVerdict {
            add: vec![Header::new("X-Size", size.to_string())],
            ..Default::default()
        })
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::load(std::path::Path::new("config.toml"))?;
    Server::builder(config).hooks(Tagger).build()?.run()?;
    Ok(())
}
