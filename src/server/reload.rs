//! Reloading a running server (SIGHUP): which keys changed, the registered reloaders,
//! all or nothing.

use super::{Handle, LOG_TARGET};
use crate::config::Config;
use crate::tls;
use std::sync::Arc;

/// A component's reaction to a reload (SIGHUP): re-read its state from the new
/// config, or say why it cannot (then the reload fails and nothing changes).
pub type Reloader = Box<dyn Fn(&Config) -> Result<(), String> + Send + Sync>;

/// What a reload needs: the settings the server runs with, the certificate and the
/// registered reloaders. The mutex also keeps two reloads from interleaving.
pub(super) struct ReloadState {
    /// The config the server started with: changed keys outside [`LIVE_KEYS`] are
    /// compared against it (they keep their start value until a restart).
    pub(super) running: Config,
    /// The config of the last successful reload (or the start): what the reloaders
    /// currently run with, to roll back to when a later reloader fails.
    pub(super) applied: Config,
    pub(super) tls: Option<Arc<tls::Reloading>>,
    pub(super) reloaders: Vec<Reloader>,
}

/// Config keys a reload applies at once; every other changed key needs a restart.
/// The certificate is reloaded from its files (same paths) on every reload.
const LIVE_KEYS: [&str; 2] = ["mailboxes", "milter"];

/// The dotted keys whose values differ between `a` and `b` (tables compared key by
/// key, anything else as a whole).
fn changed_keys(
    prefix: &str,
    a: Option<&toml::Value>,
    b: Option<&toml::Value>,
    out: &mut Vec<String>,
) {
    match (a, b) {
        (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                changed_keys(&key, x.get(k), y.get(k), out);
            }
        }
        (x, y) if x != y => out.push(prefix.to_string()),
        _ => {}
    }
}

impl Handle {
    /// Applies `new` (already parsed and validated, e.g. by [`Config::load`]) to the
    /// running server, as SIGHUP does: the certificate is read again from its files
    /// and every [`ServerBuilder::on_reload`](super::ServerBuilder::on_reload) reloader runs. All or nothing as far as
    /// possible: the certificate is loaded first but installed only after every
    /// reloader succeeded. `Ok` lists the changed keys that take effect only at the
    /// next start (listen addresses, workers, limits...); `Err` says why nothing
    /// was applied (the running settings stay).
    pub fn reload(&self, new: &Config) -> Result<Vec<String>, String> {
        new.validate()
            .map_err(|(key, msg)| format!("key `{key}`: {msg}"))?;
        let mut state = self.reload.lock().unwrap_or_else(|p| p.into_inner());
        let as_value = |c: &Config| toml::Value::try_from(c).map_err(|e| e.to_string());
        let (old_v, new_v) = (as_value(&state.running)?, as_value(new)?);
        let mut changed = Vec::new();
        changed_keys("", Some(&old_v), Some(&new_v), &mut changed);
        let restart: Vec<String> = changed
            .into_iter()
            .filter(|k| {
                !LIVE_KEYS
                    .iter()
                    .any(|live| k == live || k.starts_with(&format!("{live}.")))
            })
            .collect();
        // The same certificate files: read them again now (a renewal). Other paths
        // (or TLS switched on or off) are in `restart`.
        let cert = match (&state.tls, &new.tls, &state.running.tls) {
            (Some(resolver), Some(t), Some(old)) if t.cert == old.cert && t.key == old.key => {
                Some((resolver, resolver.load_files().map_err(|e| e.to_string())?))
            }
            _ => None,
        };
        for (i, reloader) in state.reloaders.iter().enumerate() {
            if let Err(e) = reloader(new) {
                // Put the ones that already took the new config back on the old one.
                for undo in &state.reloaders[..i] {
                    if let Err(u) = undo(&state.applied) {
                        log::error!(
                            target: LOG_TARGET,
                            "reload: rolling back a component failed: {u}"
                        );
                    }
                }
                return Err(e);
            }
        }
        if let Some((resolver, ck)) = cert {
            resolver.install(ck);
        }
        state.applied = new.clone();
        Ok(restart)
    }
}
