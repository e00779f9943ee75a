//! The controller's serving certificate. rustls asks [`ServingCert`] for it on every handshake,
//! so a reissued certificate is used from the next connection on without a restart; open
//! connections keep theirs (TLS checks validity at the handshake only).
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::ListenError;
use crate::pki::ServerCert;
use crate::state::Controller;

#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<(Arc<CertifiedKey>, ServerCert)>,
}

fn certified_key(sc: &ServerCert) -> Result<CertifiedKey, ListenError> {
    let chain = CertificateDer::pem_slice_iter(sc.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(ListenError::Pem)?;
    let key = PrivateKeyDer::from_pem_slice(sc.key_pem.as_bytes()).map_err(ListenError::Pem)?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(ListenError::BadIdentity)?;
    let ck = CertifiedKey::new(chain, signer);
    // Refuses a key that is not the leaf's.
    ck.keys_match().map_err(ListenError::BadIdentity)?;
    Ok(ck)
}

impl ServingCert {
    pub fn new(sc: ServerCert) -> Result<Self, ListenError> {
        Ok(Self { current: RwLock::new((Arc::new(certified_key(&sc)?), sc)) })
    }

    /// Serve `sc` from the next handshake on.
    pub fn replace(&self, sc: ServerCert) -> Result<(), ListenError> {
        let ck = Arc::new(certified_key(&sc)?);
        if let Ok(mut g) = self.current.write() {
            *g = (ck, sc);
        }
        Ok(())
    }

    pub fn current(&self) -> Option<ServerCert> {
        self.current.read().ok().map(|g| g.1.clone())
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|g| g.0.clone())
    }
}

/// How often to look at the certificate: often enough that a short test lifetime renews in time,
/// at most hourly.
pub fn check_every(validity: Duration) -> Duration {
    (validity / 30).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// Reissue the serving certificate when a third of its lifetime is left (and when the names
/// change), for as long as the daemon runs.
pub async fn keep_fresh(ctl: Arc<Controller>, serving: Arc<ServingCert>, names: Vec<String>, validity: Duration) {
    let mut tick = tokio::time::interval(check_every(validity));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(cur) = serving.current() else { continue };
        if !cur.due(validity) {
            continue;
        }
        let (c, n) = (ctl.clone(), names.clone());
        let issued = tokio::task::spawn_blocking(move || c.ca.server_cert(&n, validity)).await;
        match issued {
            Ok(Ok(sc)) if sc.serial != cur.serial => {
                let serial = sc.serial.clone();
                match serving.replace(sc) {
                    Ok(()) => tracing::info!(%serial, "serving certificate renewed while running"),
                    Err(e) => {
                        tracing::error!(error = %fleetadm_common::error_chain(&e), "renewed serving certificate is unusable")
                    }
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %fleetadm_common::error_chain(&e), "cannot renew the serving certificate; retrying")
            }
            Err(e) => tracing::error!(error = %e, "serving certificate renewal task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_often_enough_for_short_lifetimes_and_at_most_hourly() {
        assert_eq!(check_every(Duration::from_secs(30)), Duration::from_secs(1));
        assert_eq!(check_every(Duration::from_secs(365 * 24 * 3600)), Duration::from_secs(3600));
    }
}
