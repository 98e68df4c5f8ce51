//! `dimse/…` cases: well-framed P-DATA carrying broken DIMSE messages (missing or lying command elements,
//! fragments out of order, messages over the size cap) → a status or an A-ABORT.

use dicom_core::Tag;
use dicom_dictionary_std::uids;
use dicom_ul::pdu::PDataValueType;
use lungsentry::receive::dimse::CommandSet;

use super::builders::*;
use super::*;

pub(super) fn dimse_cases(b: &Bases, max_message: usize) -> Vec<Case> {
    let ct_ctx =
        || Setup::Associate(vec![(CT.into(), vec![EXPLICIT.into()]), (VERIFICATION.into(), vec![IMPLICIT.into()])]);
    let case = |name: &str, steps: Vec<Step>, expect: Expect, sop: Option<String>| Case {
        name: format!("dimse/{name}"),
        setup: ct_ctx(),
        steps,
        expect,
        sop_instance: sop,
        min_ms: 0,
    };
    let cmd =
        |pc: u8, cs: &CommandSet| Step::Send(pdata(vec![pdv(pc, PDataValueType::Command, true, command_bytes(cs))]));
    let raw_cmd = |pc: u8, bytes: Vec<u8>| Step::Send(pdata(vec![pdv(pc, PDataValueType::Command, true, bytes)]));
    let valid = |sop: &str| encode(&with_uid(&b.object, sop), EXPLICIT);
    let mut cases = Vec::new();

    cases.push(case("command-noise", vec![raw_cmd(3, noise(21, 40))], Expect::Abort, None));
    // Fuzz finding (dimse target): an odd length on (00F9,0000), which the dictionary types UL, left the parser
    // out of step with the bytes until it read a header claiming 4 127 195 136 bytes and allocated them.
    const FUZZ_OOM: [u8; 124] = [
        0xf9, 0x00, 0x00, 0x00, 0x31, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x48, 0x01, 0x18, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x48, 0x00,
        0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xe7, 0x00, 0x27, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x80, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x08, 0x00, 0x00, 0x12, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x32, 0x4a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf6, 0x01, 0x00, 0x00, 0x00, 0x00,
    ];
    cases.push(case("command-fuzz-oom-misaligned", vec![raw_cmd(3, FUZZ_OOM.to_vec())], Expect::Abort, None));
    // The same fault on a command element: CommandGroupLength (UL) with 5 bytes.
    let bytes = {
        let mut v = command_bytes(&CommandSet::echo_rq(1));
        v[4] = 5;
        v.insert(12, 0);
        v
    };
    cases.push(case("command-ul-odd-length", vec![raw_cmd(3, bytes)], Expect::Abort, None));
    let mut no_field = CommandSet::echo_rq(1);
    no_field.command_field = 0;
    let bytes = {
        // Encode, then drop the (0000,0100) element: group length + remaining elements.
        let full = command_bytes(&no_field);
        strip_implicit_element(&full, Tag(0x0000, 0x0100))
    };
    cases.push(case("command-without-command-field", vec![raw_cmd(3, bytes)], Expect::Abort, None));
    let mut no_id = CommandSet::echo_rq(1);
    no_id.message_id = None;
    cases.push(case("command-without-message-id", vec![cmd(3, &no_id)], Expect::Abort, None));
    cases.push(case(
        "command-over-64kib",
        vec![raw_cmd(3, {
            let mut v = command_bytes(&CommandSet::echo_rq(1));
            v.extend(std::iter::repeat_n(0u8, 70_000));
            v
        })],
        Expect::Abort,
        None,
    ));

    let s = b.sop(501);
    let mut no_ds = CommandSet::store_rq(1, CT, &s);
    no_ds.has_dataset = false;
    cases.push(case("c-store-without-dataset", vec![cmd(1, &no_ds)], Expect::Status(CANNOT_UNDERSTAND), Some(s)));
    let mut no_uid = CommandSet::store_rq(1, CT, "1.2.3");
    no_uid.affected_sop_instance_uid = None;
    let mut steps = vec![cmd(1, &no_uid)];
    steps.extend(data_fragments(1, &valid(&b.sop(502)), true));
    cases.push(case(
        "c-store-without-affected-sop-instance",
        steps,
        Expect::Status(CANNOT_UNDERSTAND),
        Some(b.sop(502)),
    ));
    let s = b.sop(503);
    let mut steps = vec![cmd(1, &CommandSet::store_rq(1, uids::MR_IMAGE_STORAGE, &s))];
    steps.extend(data_fragments(1, &valid(&s), true));
    cases.push(case("c-store-class-not-the-contexts", steps, Expect::Status(NO_SUCH_SOP_CLASS), Some(s)));
    let find = CommandSet {
        command_field: 0x0020,
        message_id: Some(5),
        affected_sop_class_uid: Some(VERIFICATION.into()),
        ..Default::default()
    };
    cases.push(case("unknown-command-c-find", vec![cmd(3, &find)], Expect::Status(UNRECOGNIZED_OPERATION), None));
    let mut rsp = CommandSet::response_to(&CommandSet::echo_rq(1), 0);
    rsp.message_id_being_responded_to = Some(1);
    cases.push(case(
        "peer-sends-a-response-then-echo",
        vec![cmd(3, &rsp), echo_step(3, 2)],
        Expect::Status(SUCCESS),
        None,
    ));
    let cancel = CommandSet { command_field: 0x0FFF, message_id_being_responded_to: Some(1), ..Default::default() };
    cases.push(case("c-cancel-then-echo", vec![cmd(3, &cancel), echo_step(3, 2)], Expect::Status(SUCCESS), None));
    cases.push(case(
        "data-fragment-before-command",
        vec![Step::Send(pdata(vec![pdv(1, PDataValueType::Data, true, valid(&b.sop(504)))]))],
        Expect::Abort,
        Some(b.sop(504)),
    ));
    let s = b.sop(505);
    let d = valid(&s);
    let mut steps = vec![cmd(1, &CommandSet::store_rq(1, CT, &s))];
    steps.extend(data_fragments(1, &d[..4000], false));
    steps.push(echo_step(3, 2));
    cases.push(case("command-while-dataset-incomplete", steps, Expect::Abort, Some(s)));
    let s = b.sop(506);
    let d = valid(&s);
    let mut steps = vec![cmd(1, &CommandSet::store_rq(1, CT, &s))];
    steps.extend(data_fragments(1, &d[..4000], false));
    steps.push(Step::Send(pdata(vec![pdv(3, PDataValueType::Data, true, d[4000..].to_vec())])));
    cases.push(case("context-switch-mid-dataset", steps, Expect::Abort, Some(s)));
    cases.push(case(
        "pdv-on-context-never-proposed",
        vec![Step::Send(pdata(vec![pdv(77, PDataValueType::Command, true, command_bytes(&CommandSet::echo_rq(1)))]))],
        Expect::Abort,
        None,
    ));
    let s = b.sop(507);
    let mut steps = vec![cmd(1, &CommandSet::store_rq(1, CT, &s))];
    let filler = vec![0u8; 16_000];
    let n = max_message / filler.len() + 4;
    for i in 0..n {
        steps.push(Step::Send(pdata(vec![pdv(1, PDataValueType::Data, i + 1 == n, filler.clone())])));
    }
    cases.push(case("message-over-max-message-mb", steps, Expect::Status(OUT_OF_RESOURCES), Some(s)));
    cases
}

/// Removes one element from an Implicit VR LE command set and fixes the group length.
fn strip_implicit_element(data: &[u8], tag: Tag) -> Vec<u8> {
    let mut out = Vec::new();
    let mut p = 0;
    while p + 8 <= data.len() {
        let t = Tag(u16::from_le_bytes([data[p], data[p + 1]]), u16::from_le_bytes([data[p + 2], data[p + 3]]));
        let len = u32::from_le_bytes(data[p + 4..p + 8].try_into().unwrap()) as usize;
        if t != tag {
            out.extend_from_slice(&data[p..p + 8 + len]);
        }
        p += 8 + len;
    }
    let gl = (out.len() - 12) as u32;
    out[8..12].copy_from_slice(&gl.to_le_bytes());
    out
}
