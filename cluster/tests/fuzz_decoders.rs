//! Property tests: the frame and record decoders take arbitrary bytes without panicking and
//! without buffering past their bounds; valid encodings round-trip.

use proptest::prelude::*;
use wse_cluster::wire::*;

proptest! {

    #[test]
    fn frame_decoder_never_panics_and_stays_bounded(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..600), 0..12)) {
        let mut d = FrameDecoder::new(PREAUTH_MAX_FRAME);
        let _ = d.take_raw::<PREFACE_LEN>();
        for c in &chunks {
            d.push(c);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => {
                        prop_assert!(f.body.len() + 4 <= PREAUTH_MAX_FRAME);
                        // Every body decoder copes with any body.
                        let _ = Hello::decode(&f.body);
                        let _ = Auth::decode(&f.body);
                        let _ = Goodbye::decode(&f.body);
                        let _ = decode_ctrl(&f.body);
                        let _ = decode_batch(f.flags, &f.body);
                    }
                    Ok(None) => break,
                    // The stream is closed after an error: nothing more is pushed.
                    Err(_) => return Ok(()),
                }
            }
            // Never more than one partial frame plus the last push.
            prop_assert!(d.buffered() <= PREAUTH_MAX_FRAME + 4 + c.len());
        }
    }

    #[test]
    fn body_decoders_never_panic(body in prop::collection::vec(any::<u8>(), 0..2048), flags in any::<u8>()) {
        let _ = Hello::decode(&body);
        let _ = Auth::decode(&body);
        let _ = Goodbye::decode(&body);
        let _ = decode_ctrl(&body);
        let _ = decode_batch(flags, &body);
        let _ = decompress(&body);
    }

    #[test]
    fn ctrl_records_round_trip(gens in prop::collection::vec((any::<u64>(), "[a-z*?.]{0,40}", any::<bool>()), 0..30)) {
        let recs: Vec<CtrlRecord> = gens.iter().map(|(g, t, sub)| {
            let pattern = Pattern::parse(t);
            if *sub { CtrlRecord::Sub { generation: *g, pattern } } else { CtrlRecord::Unsub { generation: *g, pattern } }
        }).collect();
        prop_assert_eq!(decode_ctrl(&encode_ctrl(&recs)).unwrap(), recs);
    }

    #[test]
    fn hello_round_trips(name in "[a-z0-9-]{1,30}", inc in any::<u64>(), caps in any::<u64>(), nonce in any::<[u8; 32]>()) {
        let h = Hello { cluster: "c".into(), name, incarnation: inc, advertised: "10.0.0.1:9999".into(),
            capabilities: caps, fingerprint: 7, dial_seq: 3, nonce };
        prop_assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn corrupted_compressed_batches_fail_cleanly(payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..40), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut body = Vec::new();
        for p in &payloads {
            PubRecord::new("t", p).encode(&mut body);
        }
        let mut z = compress(&body);
        prop_assert_eq!(decode_batch(FLAG_ZSTD, &z).unwrap().len(), payloads.len());
        for (i, x) in flips {
            let at = i.index(z.len());
            z[at] ^= x;
        }
        if let Ok(out) = decode_batch(FLAG_ZSTD, &z) {
            prop_assert!(out.iter().map(|r| r.payload.len()).sum::<usize>() <= MAX_DECOMPRESSED);
        }
    }
}

proptest! {
    /// The PSK record layer: arbitrary bytes never panic, never come out as plaintext, and never
    /// make it buffer more than one record plus the last read.
    #[test]
    fn opener_takes_any_bytes(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..3000), 0..8)) {
        use wse_cluster::seal::{Opener, SEAL_RECORD_MAX, TAG_LEN};
        let mut o = Opener::new(&[9; 32]);
        let mut out = Vec::new();
        for c in &chunks {
            if o.open(c, &mut out).is_err() {
                break;
            }
            prop_assert!(o.buffered() <= 4 + SEAL_RECORD_MAX + TAG_LEN + c.len());
        }
        prop_assert!(out.is_empty());
    }
}
