use super::*;
use crate::transport::record::{write_record, RecordError, RecordKind, RecordReader};

const PSK: &[u8] = b"0123456789abcdef0123";

fn keys(p: Protection) -> SessionKeys {
    SessionKeys::derive(PSK, &[1; 32], &[2; 32], p)
}

fn rec(kind: RecordKind, epoch: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    write_record(&mut v, kind, epoch, payload);
    v
}

/// Seals each record on its own (as separate sends).
fn seal_each(s: &mut Sealer, recs: &[Vec<u8>]) -> Vec<Vec<u8>> {
    recs.iter()
        .map(|r| s.seal(&[&r[..]]).unwrap().concat())
        .collect()
}

fn both() -> [Protection; 2] {
    [Protection::Mac, Protection::Encrypt]
}

#[test]
fn keys_depend_on_key_nonces_direction_and_protection() {
    let k = keys(Protection::Mac);
    assert_ne!(k.to_backup, k.to_primary, "directions share a key");
    let same = SessionKeys::derive(PSK, &[1; 32], &[2; 32], Protection::Mac);
    assert_eq!(
        (k.to_backup, k.to_primary),
        (same.to_backup, same.to_primary)
    );
    for other in [
        SessionKeys::derive(b"another key of 16+", &[1; 32], &[2; 32], Protection::Mac),
        SessionKeys::derive(PSK, &[9; 32], &[2; 32], Protection::Mac),
        SessionKeys::derive(PSK, &[1; 32], &[9; 32], Protection::Mac),
        SessionKeys::derive(PSK, &[2; 32], &[1; 32], Protection::Mac),
        SessionKeys::derive(PSK, &[1; 32], &[2; 32], Protection::Encrypt),
    ] {
        assert_ne!(k.to_backup, other.to_backup);
        assert_ne!(k.to_primary, other.to_primary);
    }
}

#[test]
fn sealed_records_open_in_order_in_both_modes() {
    for p in both() {
        let k = keys(p);
        let (mut s, _) = k.split(Role::Primary);
        let (_, mut o) = k.split(Role::Backup);
        let recs = [
            rec(RecordKind::Pages, 3, &[7; 5000]),
            rec(RecordKind::Ack, 4, b""),
        ];
        for (i, mut r) in seal_each(&mut s, &recs).into_iter().enumerate() {
            assert_eq!(r.len(), recs[i].len() + TAG_LEN);
            if p == Protection::Encrypt && i == 0 {
                assert_ne!(&r[24..5024], &[7; 5000][..], "payload sent in clear");
                assert_eq!(&r[20..24], &[0; 4], "plaintext CRC sent");
            }
            o.open(&mut r).unwrap();
            assert_eq!(&r[24..r.len() - TAG_LEN], &recs[i][24..], "{p:?}");
        }
        assert_eq!((s.sealed(), o.opened()), (2, 2));
    }
}

#[test]
fn a_record_spanning_buffers_seals_as_if_contiguous() {
    for p in both() {
        let k = keys(p);
        let (mut a, _) = k.split(Role::Primary);
        let (mut b, _) = k.split(Role::Primary);
        let two = [
            rec(RecordKind::State, 1, &[3; 999]),
            rec(RecordKind::Close, 1, b""),
        ]
        .concat();
        let whole = a.seal(&[&two[..]]).unwrap().concat();
        let split = b
            .seal(&[&two[..10], &[], &two[10..500], &two[500..]])
            .unwrap()
            .concat();
        assert_eq!(whole, split, "{p:?}");
    }
}

#[test]
fn half_a_record_is_refused_by_the_sealer() {
    let (mut s, _) = keys(Protection::Mac).split(Role::Primary);
    let r = rec(RecordKind::State, 1, &[3; 100]);
    assert!(matches!(
        s.seal(&[&r[..50]]),
        Err(AuthError::Unsealable { seq: 0, .. })
    ));
    assert!(s.seal(&[&r[..10]]).is_err());
}

#[test]
fn replayed_reordered_dropped_and_reflected_records_fail() {
    for p in both() {
        let k = keys(p);
        let (mut s, _) = k.split(Role::Primary);
        let recs: Vec<_> = (0..3).map(|e| rec(RecordKind::Ack, e, b"")).collect();
        let sealed = seal_each(&mut s, &recs);
        let open = |order: &[usize]| {
            let (_, mut o) = k.split(Role::Backup);
            for &i in order {
                let mut r = sealed[i].clone();
                if let Err(e) = o.open(&mut r) {
                    return Err((e, o.opened()));
                }
            }
            Ok(())
        };
        open(&[0, 1, 2]).unwrap();
        for (order, at) in [(&[0, 0][..], 1), (&[1, 0][..], 0), (&[0, 2][..], 1)] {
            let (e, n) = open(order).unwrap_err();
            assert_eq!(n, at, "{p:?} {order:?}: counter moved past a bad record");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!(
                    "record {at} from the primary failed authentication"
                )),
                "{msg}"
            );
        }
        // The primary's own record reflected back to it.
        let (_, mut own) = k.split(Role::Primary);
        assert!(own.open(&mut sealed[0].clone()).is_err(), "{p:?}");
        // Another session's record.
        let other = SessionKeys::derive(PSK, &[1; 32], &[3; 32], p);
        let (_, mut o) = other.split(Role::Backup);
        assert!(o.open(&mut sealed[0].clone()).is_err(), "{p:?}");
    }
}

#[test]
fn every_single_bit_flip_fails() {
    for p in both() {
        let k = keys(p);
        let (mut s, _) = k.split(Role::Backup);
        let sealed = s
            .seal(&[&rec(RecordKind::Credit, 0, &[1; 12])[..]])
            .unwrap()
            .concat();
        for bit in 0..sealed.len() * 8 {
            let mut c = sealed.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            let (_, mut o) = k.split(Role::Primary);
            assert!(o.open(&mut c).is_err(), "{p:?}: flip of bit {bit} accepted");
        }
    }
}

#[test]
fn the_reader_reports_damage_anywhere_as_an_authentication_failure() {
    let k = keys(Protection::Mac);
    let (mut s, _) = k.split(Role::Backup);
    let stream = seal_each(
        &mut s,
        &[rec(RecordKind::Ack, 1, b""), rec(RecordKind::Ack, 2, b"")],
    )
    .concat();
    let (_, o) = k.split(Role::Primary);
    let mut r = RecordReader::new(&stream[..]);
    r.authenticate(o);
    assert_eq!(r.next().unwrap().epoch, 1);
    assert_eq!(r.next().unwrap().epoch, 2);
    assert!(matches!(r.next(), Err(RecordError::Eof)));
    // Magic of the second record flipped: an authentication error naming
    // the record, not "bad magic".
    let mut bad = stream.clone();
    bad[24 + 16] ^= 1;
    let (_, o) = k.split(Role::Primary);
    let mut r = RecordReader::new(&bad[..]);
    r.authenticate(o);
    r.next().unwrap();
    let e = r.next().unwrap_err();
    assert!(
        matches!(
            e,
            RecordError::Auth(AuthError::Forged {
                seq: 1,
                from: "backup"
            })
        ),
        "{e}"
    );
    // A plain record where a sealed one is due.
    let mut injected = stream[..40].to_vec();
    injected.extend(rec(RecordKind::Ack, 9, b""));
    let (_, o) = k.split(Role::Primary);
    let mut r = RecordReader::new(&injected[..]);
    r.authenticate(o);
    r.next().unwrap();
    assert!(matches!(
        r.next(),
        Err(RecordError::Auth(_)) | Err(RecordError::Truncated { .. })
    ));
}

/// A Pages record as the data path builds it: no CRC (field 0).
fn data_rec(epoch: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    let at = crate::transport::record::begin_record(&mut v, RecordKind::Pages, epoch);
    v.extend_from_slice(payload);
    crate::transport::record::finish_record(&mut v, at);
    v
}

#[test]
fn the_crc_field_goes_out_zero_whichever_builder_made_the_record() {
    for p in both() {
        let k = keys(p);
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let checked = rec(RecordKind::Pages, 5, &payload);
        assert_ne!(&checked[20..24], &[0; 4], "write_record fills the CRC");
        let bare = data_rec(5, &payload);
        assert_eq!(&bare[20..24], &[0; 4], "the data path computes no CRC");
        let (mut a, _) = k.split(Role::Primary);
        let (mut b, _) = k.split(Role::Primary);
        let x = a.seal(&[&checked[..]]).unwrap().concat();
        let y = b.seal(&[&bare[..]]).unwrap().concat();
        assert_eq!(&x[20..24], &[0; 4], "{p:?}: CRC on the wire");
        assert_eq!(x, y, "{p:?}: the two builders' records differ sealed");
    }
}

#[test]
fn sealed_data_records_are_rejected_whole_when_cut_or_flipped() {
    for p in both() {
        let k = keys(p);
        let payload: Vec<u8> = (0..700u32).map(|i| (i * 13) as u8).collect();
        let (mut s, _) = k.split(Role::Primary);
        let sealed = s.seal(&[&data_rec(3, &payload)[..]]).unwrap().concat();
        let reader = |bytes: &[u8]| {
            let (_, o) = k.split(Role::Backup);
            let mut r = RecordReader::new(bytes);
            r.authenticate(o);
            r.next().map(|rec| rec.payload.to_vec())
        };
        assert_eq!(reader(&sealed).unwrap(), payload, "{p:?}");
        // Every bit, header fields and the zero CRC field included.
        for bit in 0..sealed.len() * 8 {
            let mut c = sealed.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            let e = reader(&c).unwrap_err();
            assert!(
                matches!(e, RecordError::Auth(AuthError::Forged { seq: 0, .. }))
                    // A flip that grows `len` asks for bytes never sent.
                    || matches!(e, RecordError::Truncated { .. }),
                "{p:?}: flip of bit {bit}: {e}"
            );
        }
        for cut in 1..sealed.len() {
            let e = reader(&sealed[..cut]).unwrap_err();
            assert!(
                matches!(e, RecordError::Truncated { .. }),
                "{p:?}: cut at {cut}: {e}"
            );
        }
    }
}

#[test]
fn an_authentic_record_carrying_a_crc_is_refused_as_a_framing_bug() {
    // What a version-4 sealer sent: a CRC under a valid MAC. The tag
    // verifies (so this is no forgery) but the field must be 0.
    let k = keys(Protection::Mac);
    let (s, _) = k.split(Role::Primary);
    let mut r = rec(RecordKind::State, 2, b"state");
    let mut h = s.dir.mac();
    h.update(&r);
    r.extend_from_slice(&tag_of(&h));
    let (_, o) = k.split(Role::Backup);
    let mut rd = RecordReader::new(&r[..]);
    rd.authenticate(o);
    let e = rd.next().unwrap_err();
    assert!(
        matches!(e, RecordError::SealedCrc { kind: RecordKind::State, epoch: 2, crc } if crc != 0),
        "{e}"
    );
    assert!(e.to_string().contains("must be 0"), "{e}");
}
