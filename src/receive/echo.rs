//! echo — the C-ECHO handler (Verification SOP class): always answers success.
//!
//! Owns: the C-ECHO-RSP. Hands on: nothing. Never: touches the event channel.

use super::dimse::CommandSet;
use super::status;

/// The response to a C-ECHO-RQ: success, echoing the message ID and the Verification SOP class.
pub(super) fn handle(request: &CommandSet) -> CommandSet {
    CommandSet::response_to(request, status::SUCCESS)
}
