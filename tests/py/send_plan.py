#!/usr/bin/env python3
"""A scripted DICOM sender (pynetdicom) for the completion tests: sends files over the associations a JSON plan
names, with pauses, and prints one JSON line of what happened.

    send_plan.py PORT PLAN.json

PLAN: {"associations": [[{"file": PATH, "pause_s": 0.0}, ...], ...], "between_s": 0.0}
Each inner list is one association (opened, every file sent with C-STORE after its pause, released); between_s
is slept between associations. Exits 1 when an association is refused or a C-STORE does not get status 0x0000.
"""
import json, sys, time

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage


def main():
    port, plan = int(sys.argv[1]), json.load(open(sys.argv[2]))
    ae = AE(ae_title="CT1")
    # A scanner's timeouts (pynetdicom's defaults are 30 s DIMSE / 60 s network): nothing here may come near them.
    ae.dimse_timeout, ae.acse_timeout, ae.network_timeout = 30, 30, 60
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    sent, failures = 0, []
    for i, items in enumerate(plan["associations"]):
        if i and plan.get("between_s"):
            time.sleep(plan["between_s"])
        assoc = ae.associate("127.0.0.1", port, ae_title="LUNGSENTRY")
        if not assoc.is_established:
            print(json.dumps({"sent": sent, "failures": [f"association {i} not established"]}))
            sys.exit(1)
        for j, it in enumerate(items):
            if it.get("pause_s"):
                time.sleep(it["pause_s"])
            if not assoc.is_established:
                failures.append(f"association {i} ended before item {j} (aborted: {assoc.is_aborted}, "
                                f"released: {assoc.is_released}) at {time.time():.3f}")
                break
            st = assoc.send_c_store(dcmread(it["file"]))
            code = getattr(st, "Status", None)
            if code != 0:
                failures.append(f"association {i} item {j} {it['file']}: status {code} at {time.time():.3f}")
            else:
                sent += 1
        if assoc.is_established:
            assoc.release()
    print(json.dumps({"sent": sent, "failures": failures}))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
