//! policy — who may associate: our AE title must be the called one, and the calling AE title + peer IP must
//! match an allow-list entry (when the list is not empty).
//!
//! Owns: the accept/reject decision and its A-ASSOCIATE-RJ reason, and the log line for a rejection.
//! Hands on: the decision to dicom-ul's negotiation (through its `AccessControl` trait), which sends the RJ.
//! Never: negotiates presentation contexts.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::{AssociationRJServiceUserReason, UserIdentity};
use tracing::warn;

use crate::config::AllowedPeer;

/// The access rule for one incoming connection (it knows the peer's address, which dicom-ul does not pass).
#[derive(Debug, Clone)]
pub(crate) struct PeerPolicy {
    /// Where the connection comes from (IPv4-mapped IPv6 addresses already unwrapped).
    pub peer: SocketAddr,
    /// Allowed calling AE + host pairs; empty = anyone.
    pub allowed: Arc<Vec<AllowedPeer>>,
}

impl PeerPolicy {
    pub(crate) fn new(peer: SocketAddr, allowed: Arc<Vec<AllowedPeer>>) -> Self {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        PeerPolicy { peer, allowed }
    }

    /// The decision, separate from dicom-ul's trait so it can be tested directly.
    pub(crate) fn decide(
        &self,
        our_ae: &str,
        calling: &str,
        called: &str,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if called.trim() != our_ae.trim() {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if self.allowed.is_empty() {
            return Ok(());
        }
        let ip = self.peer.ip();
        let ok = self.allowed.iter().any(|p| {
            p.ae_title.trim() == calling.trim()
                && p.host.parse::<IpAddr>().map(|h| h.to_canonical() == ip).unwrap_or(false)
        });
        if ok {
            Ok(())
        } else {
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        }
    }
}

impl AccessControl for PeerPolicy {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        let decision = self.decide(this_ae_title, calling_ae_title, called_ae_title);
        if let Err(reason) = &decision {
            warn!(peer = %self.peer, calling_ae = calling_ae_title.trim(), called_ae = called_ae_title.trim(),
                  %reason, "association rejected");
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(peer: &str, allowed: &[(&str, &str)]) -> PeerPolicy {
        PeerPolicy::new(
            peer.parse().unwrap(),
            Arc::new(
                allowed.iter().map(|(a, h)| AllowedPeer { ae_title: a.to_string(), host: h.to_string() }).collect(),
            ),
        )
    }

    #[test]
    fn called_ae_must_be_ours() {
        let p = policy("10.0.0.5:4000", &[]);
        assert!(p.decide("LUNGSENTRY", "CT1", "LUNGSENTRY").is_ok());
        assert!(p.decide("LUNGSENTRY", "CT1", "LUNGSENTRY ").is_ok());
        assert_eq!(
            p.decide("LUNGSENTRY", "CT1", "OTHER"),
            Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized)
        );
    }

    #[test]
    fn allow_list_needs_both_ae_and_host() {
        let p = policy("10.0.0.5:4000", &[("CT1", "10.0.0.5"), ("CT2", "10.0.0.6")]);
        assert!(p.decide("X", "CT1", "X").is_ok());
        assert!(p.decide("X", "CT2", "X").is_err());
        assert!(p.decide("X", "CT3", "X").is_err());
        let mapped = policy("[::ffff:10.0.0.6]:4000", &[("CT2", "10.0.0.6")]);
        assert!(mapped.decide("X", "CT2", "X").is_ok());
    }
}
