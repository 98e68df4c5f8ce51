//! `pdu/…` cases: broken upper-layer PDUs and misbehaving peers (bad lengths, oversize P-DATA, unknown PDU types,
//! A-ABORT or close mid-dataset, idle peers) → A-ASSOCIATE-RJ, A-ABORT, rejected contexts or a closed socket.

use dicom_dictionary_std::uids;
use dicom_ul::pdu::PDataValueType;
use dicom_ul::Pdu;
use lungsentry::receive::dimse::CommandSet;

use super::builders::*;
use super::*;

#[allow(clippy::vec_init_then_push)] // one case per push, grouped under comments
pub(super) fn pdu_cases(b: &Bases, idle_ms: u64, max_pdu: u32) -> Vec<Case> {
    let ct = || vec![(CT.to_string(), vec![EXPLICIT.to_string()])];
    let raw = |name: &str, steps: Vec<Step>, expect: Expect| Case {
        name: format!("pdu/{name}"),
        setup: Setup::Raw,
        steps,
        expect,
        sop_instance: None,
        min_ms: 0,
    };
    let assoc = |name: &str, steps: Vec<Step>, expect: Expect, sop: Option<String>| Case {
        name: format!("pdu/{name}"),
        setup: Setup::Associate(ct()),
        steps,
        expect,
        sop_instance: sop,
        min_ms: 0,
    };
    let rq = assoc_rq_bytes("LUNGSENTRY", &ct());
    let valid = |sop: &str| encode(&with_uid(&b.object, sop), EXPLICIT);
    let mut cases = Vec::new();

    // Before any association.
    cases.push(raw("unknown-pdu-type-first", vec![Step::Send(raw_pdu(0x09, 4, &[0; 4]))], Expect::Closed));
    cases.push(raw("pdu-type-zero-first", vec![Step::Send(raw_pdu(0x00, 0, &[]))], Expect::Closed));
    cases.push(raw("http-request-first", vec![Step::Send(b"GET /healthz HTTP/1.1\r\n\r\n".to_vec())], Expect::Closed));
    cases.push(raw("associate-rq-length-4gib", vec![Step::Send(raw_pdu(0x01, 0xFFFF_FFF0, &rq[6..]))], Expect::Closed));
    cases.push(raw(
        "associate-rq-truncated-then-close",
        vec![Step::Send(rq[..40].to_vec()), Step::Close],
        Expect::PeerGone,
    ));
    let mut c = raw("associate-rq-truncated-then-silence", vec![Step::Send(rq[..40].to_vec())], Expect::Closed);
    c.min_ms = idle_ms.saturating_sub(200);
    cases.push(c);
    let mut bad_version = rq.clone();
    bad_version[6..8].copy_from_slice(&[0, 0]);
    cases.push(raw("associate-rq-protocol-version-0", vec![Step::Send(bad_version)], Expect::Rejected));
    cases.push(raw(
        "associate-rq-wrong-called-ae",
        vec![Step::Send(assoc_rq_bytes("SOMEONEELSE", &ct()))],
        Expect::Rejected,
    ));
    let mut overrun = rq.clone();
    // The first variable item (application context) claims more bytes than the PDU has.
    overrun[74 + 2..74 + 4].copy_from_slice(&0x7FFFu16.to_be_bytes());
    cases.push(raw("associate-rq-item-length-overrun", vec![Step::Send(overrun)], Expect::Closed));
    cases.push(raw(
        "associate-rq-no-presentation-contexts",
        vec![Step::Send(assoc_rq_bytes("LUNGSENTRY", &[]))],
        Expect::ContextsRejected,
    ));
    for (name, a, ts) in [
        ("abstract-syntax-not-offered", uids::MR_IMAGE_STORAGE, EXPLICIT),
        ("transfer-syntax-mpeg2-only", CT, "1.2.840.10008.1.2.4.100"),
        ("transfer-syntax-bogus-uid", CT, "1.2.3.4.5.6.7.8"),
        ("transfer-syntax-big-endian-retired", CT, "1.2.840.10008.1.2.2"),
        ("transfer-syntax-not-a-uid", CT, "explicit please"),
    ] {
        cases.push(raw(
            &format!("associate-rq-{name}"),
            vec![Step::Send(assoc_rq_bytes("LUNGSENTRY", &[(a.into(), vec![ts.into()])]))],
            Expect::ContextsRejected,
        ));
    }
    cases.push(raw(
        "associate-rq-empty-transfer-syntax-list",
        vec![Step::Send(assoc_rq_bytes("LUNGSENTRY", &[(CT.into(), vec![])]))],
        Expect::ContextsRejected,
    ));
    cases.push(raw(
        "p-data-before-association",
        vec![Step::Send(pdata(vec![pdv(1, PDataValueType::Command, true, command_bytes(&CommandSet::echo_rq(1)))]))],
        Expect::Closed,
    ));
    cases.push(raw("associate-ac-from-the-caller", vec![Step::Send(raw_pdu(0x02, 4, &[0, 1, 0, 0]))], Expect::Closed));
    let mut c = raw("silent-before-associate-rq", vec![], Expect::Abort);
    c.min_ms = idle_ms.saturating_sub(200);
    cases.push(c);

    // Inside an association.
    let over = max_pdu as usize + 64;
    let mut body = vec![0u8; over];
    body[0..4].copy_from_slice(&((over - 4) as u32).to_be_bytes());
    body[4] = 1;
    body[5] = 0x03;
    cases.push(assoc("p-data-over-max-pdu", vec![Step::Send(raw_pdu(0x04, over as u32, &body))], Expect::Abort, None));
    cases.push(assoc(
        "p-data-length-4gib",
        vec![Step::Send(raw_pdu(0x04, 0xFFFF_FFF0, &[0, 0, 0, 10, 1, 3]))],
        Expect::Abort,
        None,
    ));
    let mut pd = pdata(vec![pdv(1, PDataValueType::Command, true, command_bytes(&CommandSet::echo_rq(1)))]);
    pd[6..10].copy_from_slice(&60_000u32.to_be_bytes());
    cases.push(assoc("pdv-length-overrun", vec![Step::Send(pd)], Expect::Abort, None));
    cases.push(assoc("pdv-length-zero", vec![Step::Send(raw_pdu(0x04, 4, &[0, 0, 0, 0]))], Expect::Abort, None));
    cases.push(assoc("second-associate-rq", vec![Step::Send(rq.clone())], Expect::Abort, None));
    cases.push(assoc("unknown-pdu-type-0x0a", vec![Step::Send(raw_pdu(0x0A, 4, &[1, 2, 3, 4]))], Expect::Abort, None));
    cases.push(assoc("unsolicited-release-rp", vec![Step::Send(pdu_bytes(&Pdu::ReleaseRP))], Expect::Abort, None));
    let s = b.sop(601);
    let d = valid(&s);
    let mut steps = c_store(1, 1, CT, &s, &d[..d.len() / 2]);
    steps.truncate(steps.len()); // keep: half the dataset, not marked last
    let mut steps_abort = vec![steps[0].clone()];
    steps_abort.extend(data_fragments(1, &d[..d.len() / 2], false));
    steps_abort.push(Step::Send(pdu_bytes(&Pdu::AbortRQ { source: dicom_ul::pdu::AbortRQSource::ServiceUser })));
    cases.push(assoc("a-abort-mid-dataset", steps_abort, Expect::PeerGone, Some(s)));
    let s = b.sop(602);
    let d = valid(&s);
    let mut st = c_store(1, 1, CT, &s, &[]);
    st.truncate(1);
    st.extend(data_fragments(1, &d[..d.len() / 2], false));
    st.push(Step::Close);
    cases.push(assoc("tcp-close-mid-dataset", st, Expect::PeerGone, Some(s)));
    let s = b.sop(603);
    let d = valid(&s);
    let mut st = c_store(1, 1, CT, &s, &[]);
    st.truncate(1);
    st.extend(data_fragments(1, &d[..d.len() / 2], false));
    st.push(Step::Send(pdu_bytes(&Pdu::ReleaseRQ)));
    cases.push(assoc("release-rq-mid-dataset", st, Expect::ReleaseRp, Some(s)));
    let mut c = assoc("idle-after-association", vec![], Expect::Abort, None);
    c.min_ms = idle_ms.saturating_sub(200);
    cases.push(c);
    let s = b.sop(604);
    let d = valid(&s);
    let mut st = c_store(1, 1, CT, &s, &[]);
    st.truncate(1);
    st.extend(data_fragments(1, &d[..d.len() / 2], false));
    let mut c = assoc("idle-mid-dataset", st, Expect::Abort, Some(s));
    c.min_ms = idle_ms.saturating_sub(200);
    cases.push(c);
    let mut c = assoc("half-pdu-header-then-silence", vec![Step::Send(vec![0x04, 0x00, 0x00])], Expect::Abort, None);
    c.min_ms = idle_ms.saturating_sub(200);
    cases.push(c);
    cases
}
