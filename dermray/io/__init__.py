"""Storage and run safety, under every stage: local and s3:// files written atomically (storage),
the single-writer lock on OUT (lock), the fingerprints that decide whether old work is reused
(fingerprint), and the named crash points of the fault-matrix tests (faults). No Ray here."""
