//! dimse — the DIMSE message layer that dicom-ul does not have: command sets and message assembly.
//!
//! Owns: encoding and decoding command sets (always Implicit VR Little Endian, PS3.7 §6.3.1), and turning a
//! stream of P-DATA value fragments into complete messages (command set + optional dataset), with a cap on
//! the message size that never allocates more than what actually arrived, and (when given one) a charge on the
//! shared [`BufferBudget`] taken before the dataset buffer grows.
//! Hands on: [`Message`]s to the association handler (SCP) and to `scu` (responses).
//! Never: touches sockets or PDUs, interprets datasets, or decides statuses.

use std::borrow::Cow;
use std::sync::Arc;

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
use dicom_ul::pdu::{PDataValue, PDataValueType};

use super::budget::{BufferBudget, Charge};

/// Command Field values (PS3.7 §E.1) we send or recognise.
pub mod command {
    /// C-STORE request.
    pub const C_STORE_RQ: u16 = 0x0001;
    /// C-STORE response.
    pub const C_STORE_RSP: u16 = 0x8001;
    /// C-ECHO request.
    pub const C_ECHO_RQ: u16 = 0x0030;
    /// C-ECHO response.
    pub const C_ECHO_RSP: u16 = 0x8030;
    /// C-CANCEL request (never answered).
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
    /// Bit set in every response's command field.
    pub const RESPONSE_BIT: u16 = 0x8000;
}

/// CommandDataSetType value meaning "no dataset follows".
pub const NO_DATASET: u16 = 0x0101;
/// CommandDataSetType value we send when a dataset follows (any other value means the same).
pub const DATASET_PRESENT: u16 = 0x0000;
/// Priority MEDIUM.
pub const PRIORITY_MEDIUM: u16 = 0x0000;

/// Largest command set accepted; real ones are a few hundred bytes.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// Why a command set or a fragment sequence could not be used. Each of these ends the association
/// (A-ABORT): without a readable command there is no message ID to answer.
#[derive(Debug, thiserror::Error)]
pub enum DimseError {
    #[error("command set does not parse as Implicit VR LE: {0}")]
    CommandParse(String),
    #[error("command set lacks {0}")]
    CommandMissing(&'static str),
    #[error("command set larger than {MAX_COMMAND_BYTES} bytes")]
    CommandTooLarge,
    #[error("dataset fragment received while a command was expected")]
    UnexpectedDataFragment,
    #[error("command fragment received while the dataset of message on context {0} was incomplete")]
    UnexpectedCommandFragment(u8),
    #[error("fragment on presentation context {got} inside a message on context {expected}")]
    ContextSwitch { expected: u8, got: u8 },
    #[error("command set could not be encoded: {0}")]
    CommandEncode(String),
}

/// A decoded command set: the fields the DIMSE services we speak use.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CommandSet {
    /// Command Field (0000,0100): which DIMSE operation.
    pub command_field: u16,
    /// Message ID (0000,0110), present on requests.
    pub message_id: Option<u16>,
    /// Message ID Being Responded To (0000,0120), present on responses.
    pub message_id_being_responded_to: Option<u16>,
    /// Affected SOP Class UID (0000,0002), padding trimmed.
    pub affected_sop_class_uid: Option<String>,
    /// Affected SOP Instance UID (0000,1000), padding trimmed.
    pub affected_sop_instance_uid: Option<String>,
    /// Priority (0000,0700) of a request.
    pub priority: Option<u16>,
    /// Whether a dataset follows (CommandDataSetType != 0x0101).
    pub has_dataset: bool,
    /// Status (0000,0900) of a response.
    pub status: Option<u16>,
    /// Error Comment (0000,0902) of a failure response.
    pub error_comment: Option<String>,
}

fn uid_value(uid: &str) -> PrimitiveValue {
    let mut s = uid.to_string();
    if s.len() % 2 == 1 {
        s.push('\0');
    }
    PrimitiveValue::from(s)
}

fn text_value(text: &str) -> PrimitiveValue {
    let mut s = text.to_string();
    if s.len() % 2 == 1 {
        s.push(' ');
    }
    PrimitiveValue::from(s)
}

impl CommandSet {
    /// A C-ECHO-RQ.
    pub fn echo_rq(message_id: u16) -> Self {
        CommandSet {
            command_field: command::C_ECHO_RQ,
            message_id: Some(message_id),
            affected_sop_class_uid: Some(dicom_dictionary_std::uids::VERIFICATION.to_string()),
            ..Default::default()
        }
    }

    /// A C-STORE-RQ announcing a dataset.
    pub fn store_rq(message_id: u16, sop_class_uid: &str, sop_instance_uid: &str) -> Self {
        CommandSet {
            command_field: command::C_STORE_RQ,
            message_id: Some(message_id),
            affected_sop_class_uid: Some(sop_class_uid.to_string()),
            affected_sop_instance_uid: Some(sop_instance_uid.to_string()),
            priority: Some(PRIORITY_MEDIUM),
            has_dataset: true,
            ..Default::default()
        }
    }

    /// The response to `request` with `status`: command field with the response bit, the request's message
    /// ID echoed, and its affected SOP class/instance UIDs echoed.
    pub fn response_to(request: &CommandSet, status: u16) -> Self {
        CommandSet {
            command_field: request.command_field | command::RESPONSE_BIT,
            message_id_being_responded_to: request.message_id,
            affected_sop_class_uid: request.affected_sop_class_uid.clone(),
            affected_sop_instance_uid: request.affected_sop_instance_uid.clone(),
            status: Some(status),
            ..Default::default()
        }
    }

    /// Whether this is a response (command field has the response bit).
    pub fn is_response(&self) -> bool {
        self.command_field & command::RESPONSE_BIT != 0
    }

    /// Encodes as Implicit VR LE with the Command Group Length first.
    pub fn encode(&self) -> Result<Vec<u8>, DimseError> {
        let mut elements = Vec::with_capacity(9);
        if let Some(uid) = &self.affected_sop_class_uid {
            elements.push(DataElement::new(tags::AFFECTED_SOP_CLASS_UID, VR::UI, uid_value(uid)));
        }
        elements.push(DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(self.command_field)));
        if let Some(id) = self.message_id {
            elements.push(DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(id)));
        }
        if let Some(id) = self.message_id_being_responded_to {
            elements.push(DataElement::new(tags::MESSAGE_ID_BEING_RESPONDED_TO, VR::US, PrimitiveValue::from(id)));
        }
        if let Some(p) = self.priority {
            elements.push(DataElement::new(tags::PRIORITY, VR::US, PrimitiveValue::from(p)));
        }
        let dataset_type = if self.has_dataset { DATASET_PRESENT } else { NO_DATASET };
        elements.push(DataElement::new(tags::COMMAND_DATA_SET_TYPE, VR::US, PrimitiveValue::from(dataset_type)));
        if let Some(s) = self.status {
            elements.push(DataElement::new(tags::STATUS, VR::US, PrimitiveValue::from(s)));
        }
        if let Some(c) = &self.error_comment {
            // LO: at most 64 characters.
            let c: String = c.chars().filter(|c| c.is_ascii() && !c.is_ascii_control()).take(64).collect();
            elements.push(DataElement::new(tags::ERROR_COMMENT, VR::LO, text_value(&c)));
        }
        if let Some(uid) = &self.affected_sop_instance_uid {
            elements.push(DataElement::new(tags::AFFECTED_SOP_INSTANCE_UID, VR::UI, uid_value(uid)));
        }
        let obj = InMemDicomObject::command_from_element_iter(elements);
        let mut out = Vec::with_capacity(256);
        obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
            .map_err(|e| DimseError::CommandEncode(e.to_string()))?;
        Ok(out)
    }

    /// Decodes an Implicit VR LE command set. Command Field is required; the rest is optional here and
    /// checked by each command's handler.
    pub fn decode(bytes: &[u8]) -> Result<Self, DimseError> {
        check_command_lengths(bytes)?;
        let obj = InMemDicomObject::read_dataset_with_ts(bytes, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
            .map_err(|e| DimseError::CommandParse(e.to_string()))?;
        let uint = |tag: Tag| obj.get(tag).and_then(|e| e.to_int::<u16>().ok());
        let text = |tag: Tag| {
            obj.get(tag).and_then(|e| e.to_str().ok()).map(|s: Cow<str>| s.trim_end_matches(['\0', ' ']).to_string())
        };
        let command_field = uint(tags::COMMAND_FIELD).ok_or(DimseError::CommandMissing("CommandField (0000,0100)"))?;
        let has_dataset = match uint(tags::COMMAND_DATA_SET_TYPE) {
            Some(t) => t != NO_DATASET,
            None => return Err(DimseError::CommandMissing("CommandDataSetType (0000,0800)")),
        };
        Ok(CommandSet {
            command_field,
            message_id: uint(tags::MESSAGE_ID),
            message_id_being_responded_to: uint(tags::MESSAGE_ID_BEING_RESPONDED_TO),
            affected_sop_class_uid: text(tags::AFFECTED_SOP_CLASS_UID).filter(|s| !s.is_empty()),
            affected_sop_instance_uid: text(tags::AFFECTED_SOP_INSTANCE_UID).filter(|s| !s.is_empty()),
            priority: uint(tags::PRIORITY),
            has_dataset,
            status: uint(tags::STATUS),
            error_comment: text(tags::ERROR_COMMENT),
        })
    }
}

/// Checks every element of a (flat, Implicit VR LE) command set before the parser sees it: command elements
/// only (group 0000, PS3.7 §6.3.1), each length a whole number of its VR's values and within the bytes that
/// follow. The parser allocates and zero-fills each declared length up front, so 40 bytes of noise claiming a
/// 3 GiB element would otherwise cost 3 GiB and seconds of memset (corpus case dimse/command-noise); and a
/// length that is not a multiple of the value size puts it out of step with the bytes, where it finds such
/// lengths in the middle of values (fuzz finding, dimse/command-ul-odd-length).
fn check_command_lengths(bytes: &[u8]) -> Result<(), DimseError> {
    let mut p = 0usize;
    while p < bytes.len() {
        if bytes.len() - p < 8 {
            return Err(DimseError::CommandParse(format!("truncated element header at offset {p}")));
        }
        let group = u16::from_le_bytes([bytes[p], bytes[p + 1]]);
        let element = u16::from_le_bytes([bytes[p + 2], bytes[p + 3]]);
        if group != 0 {
            return Err(DimseError::CommandParse(format!(
                "element ({group:04X},{element:04X}) at offset {p} is not a command element (group 0000)"
            )));
        }
        let len = u32::from_le_bytes([bytes[p + 4], bytes[p + 5], bytes[p + 6], bytes[p + 7]]) as usize;
        let unit = crate::dicom::value_unit(crate::dicom::implicit_vr((group, element)));
        if len % unit != 0 {
            return Err(DimseError::CommandParse(format!(
                "element (0000,{element:04X}) at offset {p} has length {len}, not a multiple of {unit}"
            )));
        }
        p += 8;
        if len > bytes.len() - p {
            return Err(DimseError::CommandParse(format!(
                "element at offset {} claims {len} bytes but only {} remain",
                p - 8,
                bytes.len() - p
            )));
        }
        p += len;
    }
    Ok(())
}

/// The dataset part of a message.
#[derive(Debug)]
pub enum Payload {
    /// The command announced no dataset.
    None,
    /// Every byte of the dataset, as received.
    Complete(Vec<u8>),
    /// The message grew past the cap; the bytes were dropped as they arrived, only counted.
    Oversize {
        /// Bytes of dataset received in all.
        received: u64,
    },
    /// The shared memory budget (`dicom.max_buffered_mb`) had no room for the next fragment: what the message
    /// held was freed then and the rest was dropped as it arrived, only counted.
    OverBudget {
        /// Bytes of message received in all.
        received: u64,
    },
}

/// One complete DIMSE message.
#[derive(Debug)]
pub struct Message {
    /// Presentation context the message travelled on.
    pub presentation_context_id: u8,
    /// Its command set.
    pub command: CommandSet,
    /// Its dataset, if any.
    pub payload: Payload,
    /// The budget bytes a complete dataset holds (None without a budget or a dataset); keep it until the
    /// dataset is out of memory.
    pub charge: Option<Charge>,
}

/// Why the rest of a message is being dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dropping {
    /// Not dropping: the buffer keeps the bytes.
    No,
    /// Past `max_message_bytes`.
    Oversize,
    /// No room left in the shared budget.
    OverBudget,
}

/// Where the assembler is within the current message.
#[derive(Debug)]
enum State {
    /// Between messages.
    Idle,
    /// Collecting command fragments.
    Command { pc: u8, buf: Vec<u8> },
    /// Collecting dataset fragments after a complete command.
    Data { pc: u8, command: CommandSet, buf: Vec<u8>, received: u64, dropping: Dropping, charge: Option<Charge> },
}

/// Budget bytes charged per received dataset byte: the byte itself and, reserved while it arrives, its share of
/// the spool's working copy (the parse). A message that completes so has its copy's room already, which is what
/// keeps peers that all send big from starving each other: a message is only ever refused while growing, and the
/// one that completes never has to give way (with the copy taken only at completion, 16 × 40 MiB into 96 MiB once
/// ended with all 16 refused).
pub const WORKING_COPIES: u64 = 2;

/// Turns P-DATA value fragments into complete messages.
///
/// The cap (`max_message_bytes`) counts command + dataset bytes. Past it, the dataset buffer is freed and
/// the rest of that message is read and thrown away, so the sender gets a failure status for that one
/// instance instead of a dropped association; memory never exceeds the cap plus one fragment. With a budget,
/// each data fragment is charged to it before the buffer grows; a fragment it has no room for frees the message
/// (its charge given back) and the message completes as [`Payload::OverBudget`].
#[derive(Debug)]
pub struct MessageAssembler {
    /// Largest message (command + dataset) kept, in bytes.
    max_message_bytes: u64,
    /// The memory budget shared with the other associations (None: only the cap applies).
    budget: Option<Arc<BufferBudget>>,
    /// Current position within a message.
    state: State,
}

impl MessageAssembler {
    /// An assembler keeping messages up to `max_message_bytes`.
    pub fn new(max_message_bytes: u64) -> Self {
        MessageAssembler { max_message_bytes, budget: None, state: State::Idle }
    }

    /// An assembler keeping messages up to `max_message_bytes` whose dataset buffers are charged to `budget`.
    pub fn with_budget(max_message_bytes: u64, budget: Arc<BufferBudget>) -> Self {
        MessageAssembler { max_message_bytes, budget: Some(budget), state: State::Idle }
    }

    /// Whether no message is partly received (a safe point to stop the association).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Idle)
    }

    /// Feeds one fragment; returns a message when this fragment completed one.
    pub fn push(&mut self, pdv: PDataValue) -> Result<Option<Message>, DimseError> {
        let pc = pdv.presentation_context_id;
        match (std::mem::replace(&mut self.state, State::Idle), pdv.value_type.clone()) {
            (State::Idle, PDataValueType::Command) => self.command_fragment(pc, Vec::new(), pdv),
            (State::Command { pc: expected, buf }, PDataValueType::Command) => {
                if expected != pc {
                    return Err(DimseError::ContextSwitch { expected, got: pc });
                }
                self.command_fragment(pc, buf, pdv)
            }
            (State::Idle, PDataValueType::Data) | (State::Command { .. }, PDataValueType::Data) => {
                Err(DimseError::UnexpectedDataFragment)
            }
            (State::Data { pc: expected, .. }, PDataValueType::Command) => {
                Err(DimseError::UnexpectedCommandFragment(expected))
            }
            (
                State::Data { pc: expected, command, mut buf, mut received, mut dropping, mut charge },
                PDataValueType::Data,
            ) => {
                if expected != pc {
                    return Err(DimseError::ContextSwitch { expected, got: pc });
                }
                // `received` started at the command's length, so the cap covers command + dataset.
                received += pdv.data.len() as u64;
                if dropping == Dropping::No {
                    if received > self.max_message_bytes {
                        dropping = Dropping::Oversize;
                    } else if !charge.as_mut().is_none_or(|c| c.grow(WORKING_COPIES * pdv.data.len() as u64)) {
                        dropping = Dropping::OverBudget;
                    } else if buf.is_empty() {
                        buf = pdv.data;
                    } else {
                        buf.extend_from_slice(&pdv.data);
                    }
                    if dropping != Dropping::No {
                        // Free what the message held now, not when it ends: others may use the room meanwhile.
                        buf = Vec::new();
                        charge = None;
                    }
                }
                if pdv.is_last {
                    let payload = match dropping {
                        Dropping::No => Payload::Complete(buf),
                        Dropping::Oversize => Payload::Oversize { received },
                        Dropping::OverBudget => Payload::OverBudget { received },
                    };
                    Ok(Some(Message { presentation_context_id: pc, command, payload, charge }))
                } else {
                    self.state = State::Data { pc, command, buf, received, dropping, charge };
                    Ok(None)
                }
            }
        }
    }

    fn command_fragment(&mut self, pc: u8, mut buf: Vec<u8>, pdv: PDataValue) -> Result<Option<Message>, DimseError> {
        if buf.len() + pdv.data.len() > MAX_COMMAND_BYTES {
            return Err(DimseError::CommandTooLarge);
        }
        buf.extend_from_slice(&pdv.data);
        if !pdv.is_last {
            self.state = State::Command { pc, buf };
            return Ok(None);
        }
        let command = CommandSet::decode(&buf)?;
        if command.has_dataset {
            // The command's own bytes count against the cap too.
            let received = buf.len() as u64;
            let dropping = if received > self.max_message_bytes { Dropping::Oversize } else { Dropping::No };
            let charge = self.budget.as_ref().map(|b| b.charge());
            self.state = State::Data { pc, command, buf: Vec::new(), received, dropping, charge };
            Ok(None)
        } else {
            Ok(Some(Message { presentation_context_id: pc, command, payload: Payload::None, charge: None }))
        }
    }
}

/// Splits an encoded command set into the one P-DATA value that carries it (command sets are far smaller
/// than the minimum PDU size).
pub fn command_pdv(presentation_context_id: u8, encoded: Vec<u8>) -> PDataValue {
    PDataValue { presentation_context_id, value_type: PDataValueType::Command, is_last: true, data: encoded }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frag(pc: u8, ty: PDataValueType, last: bool, data: &[u8]) -> PDataValue {
        PDataValue { presentation_context_id: pc, value_type: ty, is_last: last, data: data.to_vec() }
    }

    #[test]
    fn command_round_trip_echoes_uids_and_ids() {
        let rq = CommandSet::store_rq(7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45");
        let bytes = rq.encode().unwrap();
        assert_eq!(bytes.len() % 2, 0);
        let back = CommandSet::decode(&bytes).unwrap();
        assert_eq!(back, rq);
        let rsp = CommandSet::response_to(&back, 0xA700);
        let rsp_back = CommandSet::decode(&rsp.encode().unwrap()).unwrap();
        assert_eq!(rsp_back.command_field, command::C_STORE_RSP);
        assert_eq!(rsp_back.message_id_being_responded_to, Some(7));
        assert_eq!(rsp_back.affected_sop_instance_uid.as_deref(), Some("1.2.3.45"));
        assert_eq!(rsp_back.status, Some(0xA700));
        assert!(!rsp_back.has_dataset);
    }

    #[test]
    fn lengths_out_of_step_with_the_value_size_are_refused() {
        // CommandGroupLength (UL) with 5 bytes: the parser would read one value and lose a byte.
        let mut v = CommandSet::echo_rq(1).encode().unwrap();
        v[4] = 5;
        v.insert(12, 0);
        let err = CommandSet::decode(&v).unwrap_err().to_string();
        assert!(err.contains("not a multiple of 4"), "{err}");
        // Elements outside group 0000 have no place in a command set.
        let mut v = CommandSet::echo_rq(1).encode().unwrap();
        v.extend_from_slice(&[0x08, 0, 0x18, 0, 2, 0, 0, 0, b'1', 0]);
        let err = CommandSet::decode(&v).unwrap_err().to_string();
        assert!(err.contains("(0008,0018)"), "{err}");
    }

    #[test]
    fn group_length_is_first_and_correct() {
        let bytes = CommandSet::echo_rq(1).encode().unwrap();
        // (0000,0000) UL, length 4, value = bytes after this element
        assert_eq!(&bytes[0..8], &[0, 0, 0, 0, 4, 0, 0, 0]);
        let gl = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!(gl, bytes.len() - 12);
    }

    #[test]
    fn assembles_fragments_and_caps_size() {
        let cmd = CommandSet::store_rq(1, "1.2", "1.2.3").encode().unwrap();
        let (a, b) = cmd.split_at(10);
        let mut asm = MessageAssembler::new(cmd.len() as u64 + 8);
        assert!(asm.push(frag(1, PDataValueType::Command, false, a)).unwrap().is_none());
        assert!(asm.push(frag(1, PDataValueType::Command, true, b)).unwrap().is_none());
        assert!(!asm.is_idle());
        assert!(asm.push(frag(1, PDataValueType::Data, false, &[1, 2, 3, 4])).unwrap().is_none());
        let m = asm.push(frag(1, PDataValueType::Data, true, &[5, 6, 7, 8])).unwrap().unwrap();
        assert!(matches!(m.payload, Payload::Complete(ref d) if d == &[1, 2, 3, 4, 5, 6, 7, 8]));
        assert!(asm.is_idle());

        // one byte over the cap: the message completes as Oversize, and the next one is fine again
        asm.push(frag(3, PDataValueType::Command, true, &cmd)).unwrap();
        asm.push(frag(3, PDataValueType::Data, false, &[0; 8])).unwrap();
        let m = asm.push(frag(3, PDataValueType::Data, true, &[0; 1])).unwrap().unwrap();
        assert!(matches!(m.payload, Payload::Oversize { received } if received == cmd.len() as u64 + 9));
        asm.push(frag(1, PDataValueType::Command, true, &cmd)).unwrap();
        let m = asm.push(frag(1, PDataValueType::Data, true, &[9; 2])).unwrap().unwrap();
        assert!(matches!(m.payload, Payload::Complete(_)));
    }

    #[test]
    fn a_message_the_budget_has_no_room_for_is_dropped_and_frees_its_bytes() {
        let cmd = CommandSet::store_rq(1, "1.2", "1.2.3").encode().unwrap();
        let budget = BufferBudget::new(20);
        let mut a = MessageAssembler::with_budget(1 << 20, budget.clone());
        let mut b = MessageAssembler::with_budget(1 << 20, budget.clone());
        a.push(frag(1, PDataValueType::Command, true, &cmd)).unwrap();
        b.push(frag(1, PDataValueType::Command, true, &cmd)).unwrap();
        a.push(frag(1, PDataValueType::Data, false, &[1; 6])).unwrap();
        assert_eq!(budget.used(), 12, "six bytes and the room for their working copy");
        b.push(frag(1, PDataValueType::Data, false, &[2; 2])).unwrap();
        assert_eq!(budget.used(), 16);
        // b's second fragment does not fit beside a's twelve bytes: b drops everything it held.
        b.push(frag(1, PDataValueType::Data, false, &[2; 4])).unwrap();
        assert_eq!(budget.used(), 12, "b's four bytes were given back");
        b.push(frag(1, PDataValueType::Data, false, &[2; 4])).unwrap();
        assert_eq!(budget.used(), 12, "the rest of b is only counted");
        let m = b.push(frag(1, PDataValueType::Data, true, &[2; 4])).unwrap().unwrap();
        assert!(matches!(m.payload, Payload::OverBudget { received } if received == cmd.len() as u64 + 14));
        assert!(m.charge.is_none());
        // a completes into the room b left, and holds its bytes (and their copy's) until its message is dropped.
        let m = a.push(frag(1, PDataValueType::Data, true, &[1; 4])).unwrap().unwrap();
        assert!(matches!(m.payload, Payload::Complete(ref d) if d.len() == 10));
        assert_eq!(budget.used(), 20);
        drop(m);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn protocol_violations_are_errors() {
        let cmd = CommandSet::store_rq(1, "1.2", "1.2.3").encode().unwrap();
        let mut asm = MessageAssembler::new(1 << 20);
        assert!(matches!(asm.push(frag(1, PDataValueType::Data, true, &[0])), Err(DimseError::UnexpectedDataFragment)));
        let mut asm = MessageAssembler::new(1 << 20);
        asm.push(frag(1, PDataValueType::Command, true, &cmd)).unwrap();
        assert!(matches!(asm.push(frag(3, PDataValueType::Data, true, &[0])), Err(DimseError::ContextSwitch { .. })));
        let mut asm = MessageAssembler::new(1 << 20);
        assert!(asm.push(frag(1, PDataValueType::Command, true, &[1, 2, 3])).is_err());
        let echo = CommandSet::echo_rq(5).encode().unwrap();
        let mut asm = MessageAssembler::new(1 << 20);
        let m = asm.push(frag(1, PDataValueType::Command, true, &echo)).unwrap().unwrap();
        assert!(matches!(m.payload, Payload::None));
        assert_eq!(m.command.message_id, Some(5));
    }
}
