use super::super::testing::{
    V1, V2, V2_STREAM, Wire, decode_err, decode_exact, relation, relation_wire, text,
};
use super::*;

#[test]
fn begin() {
    let wire = Wire::tag(b'B')
        .u64(0x16_B374_D848)
        .i64(777_000_000)
        .u32(4242);
    assert_eq!(
        decode_exact(wire, V1),
        Message::Begin(Begin {
            final_lsn: Lsn(0x16_B374_D848),
            commit_time: PgTimestamp(777_000_000),
            xid: 4242,
        })
    );
}

#[test]
fn commit() {
    let wire = Wire::tag(b'C').u8(0).u64(10).u64(20).i64(-5);
    assert_eq!(
        decode_exact(wire, V2),
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_time: PgTimestamp(-5),
        })
    );
}

#[test]
fn origin_with_and_without_stream() {
    // Origin never carries an xid, even inside a streamed block.
    for ctx in [V1, V2, V2_STREAM] {
        let wire = Wire::tag(b'O').u64(99).str("upstream_é");
        assert_eq!(
            decode_exact(wire, ctx),
            Message::Origin(Origin {
                lsn: Lsn(99),
                name: "upstream_é".into(),
            })
        );
    }
}

#[test]
fn relation_outside_and_inside_a_stream() {
    assert_eq!(decode_exact(relation_wire(None), V1), relation(None));
    assert_eq!(decode_exact(relation_wire(None), V2), relation(None));
    assert_eq!(
        decode_exact(relation_wire(Some(731)), V2_STREAM),
        relation(Some(731))
    );
}

#[test]
fn relation_replica_identities() {
    for (byte, identity) in [
        (b'd', ReplicaIdentity::Default),
        (b'n', ReplicaIdentity::Nothing),
        (b'f', ReplicaIdentity::Full),
        (b'i', ReplicaIdentity::Index),
    ] {
        let wire = Wire::tag(b'R').u32(1).str("").str("t").u8(byte).i16(0);
        let Message::Relation(r) = decode_exact(wire, V1) else {
            panic!("not a relation")
        };
        assert_eq!(r.replica_identity, identity);
        assert_eq!(r.namespace, "", "pg_catalog is sent as an empty namespace");
    }
    let err = decode_err(Wire::tag(b'R').u32(1).str("").str("t").u8(b'x').i16(0), V1);
    assert_eq!(err.offset, 8);
    assert!(matches!(
        err.kind,
        DecodeErrorKind::BadByte {
            field: "replica identity",
            found: b'x',
            ..
        }
    ));
}

#[test]
fn type_message() {
    let wire = Wire::tag(b'Y').u32(3).u32(16_400).str("app").str("mood");
    assert_eq!(
        decode_exact(wire, V2_STREAM),
        Message::Type(Type {
            xid: Some(3),
            oid: 16_400,
            namespace: "app".into(),
            name: "mood".into(),
        })
    );
}

#[test]
fn insert_with_every_column_kind() {
    let wire = Wire::tag(b'I')
        .u32(16_384)
        .u8(b'N')
        .i16(4)
        .u8(b'n')
        .u8(b'u')
        .text("héllo")
        .u8(b'b')
        .i32(3)
        .raw(&[0, 1, 2]);
    assert_eq!(
        decode_exact(wire, V1),
        Message::Insert(Insert {
            xid: None,
            relation: 16_384,
            new: Tuple(vec![
                Value::Null,
                Value::UnchangedToast,
                text("héllo"),
                Value::Binary(Bytes::from_static(&[0, 1, 2])),
            ]),
        })
    );
}

#[test]
fn values_are_slices_of_the_input() {
    let bytes = Wire::tag(b'I')
        .u32(1)
        .u8(b'N')
        .i16(1)
        .text("a large value")
        .bytes();
    let Message::Insert(insert) = decode(&bytes, V1).unwrap() else {
        panic!("not an insert")
    };
    let Value::Text(value) = &insert.new.0[0] else {
        panic!("not text")
    };
    // Same memory, not a copy: the pointer lies inside the input buffer.
    let input = bytes.as_ptr_range();
    assert!(input.contains(&value.as_ptr()));
}

#[test]
fn update_without_old_with_key_and_with_full_old() {
    let new = || Wire::default().u8(b'N').i16(2).text("1").u8(b'u');
    let new_tuple = Tuple(vec![text("1"), Value::UnchangedToast]);

    let plain = Wire::tag(b'U').u32(7).raw(&new().0);
    assert_eq!(
        decode_exact(plain, V1),
        Message::Update(Update {
            xid: None,
            relation: 7,
            old: None,
            new: new_tuple.clone(),
        })
    );

    let key = Wire::tag(b'U')
        .u32(9)
        .u32(7)
        .u8(b'K')
        .i16(2)
        .text("0")
        .u8(b'n')
        .raw(&new().0);
    assert_eq!(
        decode_exact(key, V2_STREAM),
        Message::Update(Update {
            xid: Some(9),
            relation: 7,
            old: Some(OldTuple::Key(Tuple(vec![text("0"), Value::Null]))),
            new: new_tuple.clone(),
        })
    );

    let full = Wire::tag(b'U')
        .u32(7)
        .u8(b'O')
        .i16(2)
        .text("1")
        .text("old")
        .raw(&new().0);
    assert_eq!(
        decode_exact(full, V2),
        Message::Update(Update {
            xid: None,
            relation: 7,
            old: Some(OldTuple::Full(Tuple(vec![text("1"), text("old")]))),
            new: new_tuple,
        })
    );
}

#[test]
fn update_needs_new_tuple_after_old() {
    let wire = Wire::tag(b'U').u32(7).u8(b'K').i16(0).u8(b'K').i16(0);
    let err = decode_err(wire, V1);
    assert_eq!(err.offset, 8);
    assert!(matches!(
        err.kind,
        DecodeErrorKind::BadByte {
            field: "new tuple marker",
            found: b'K',
            ..
        }
    ));
}

#[test]
fn delete_key_and_full() {
    let key = Wire::tag(b'D').u32(7).u8(b'K').i16(1).text("42");
    assert_eq!(
        decode_exact(key, V1),
        Message::Delete(Delete {
            xid: None,
            relation: 7,
            old: OldTuple::Key(Tuple(vec![text("42")])),
        })
    );
    let full = Wire::tag(b'D').u32(5).u32(7).u8(b'O').i16(1).text("42");
    assert_eq!(
        decode_exact(full, V2_STREAM),
        Message::Delete(Delete {
            xid: Some(5),
            relation: 7,
            old: OldTuple::Full(Tuple(vec![text("42")])),
        })
    );
    let err = decode_err(Wire::tag(b'D').u32(7).u8(b'N').i16(0), V1);
    assert!(matches!(
        err.kind,
        DecodeErrorKind::BadByte { found: b'N', .. }
    ));
}

#[test]
fn truncate_with_options() {
    for (options, cascade, restart_identity) in [
        (0, false, false),
        (1, true, false),
        (2, false, true),
        (3, true, true),
    ] {
        let wire = Wire::tag(b'T').i32(2).u8(options).u32(10).u32(11);
        assert_eq!(
            decode_exact(wire, V2),
            Message::Truncate(Truncate {
                xid: None,
                cascade,
                restart_identity,
                relations: vec![10, 11],
            })
        );
    }
    let streamed = Wire::tag(b'T').u32(77).i32(1).u8(0).u32(10);
    assert_eq!(decode_exact(streamed, V2_STREAM).streamed_xid(), Some(77));
    let err = decode_err(Wire::tag(b'T').i32(0).u8(4), V1);
    assert_eq!(err.offset, 5);
}

#[test]
fn truncate_count_is_checked_before_allocating() {
    // A count of two billion relations with four bytes behind it.
    let err = decode_err(Wire::tag(b'T').i32(i32::MAX).u8(0).u32(1), V1);
    assert_eq!(err.offset, 1);
    assert!(matches!(
        err.kind,
        DecodeErrorKind::Truncated {
            field: "relation oids",
            remaining: 4,
            ..
        }
    ));
    let err = decode_err(Wire::tag(b'T').i32(-1).u8(0), V1);
    assert!(matches!(
        err.kind,
        DecodeErrorKind::NegativeLength { value: -1, .. }
    ));
}

#[test]
fn logical_message() {
    let wire = Wire::tag(b'M')
        .u8(1)
        .u64(0x1_0000_0000)
        .str("updog")
        .i32(4)
        .raw(b"\0\xffok");
    assert_eq!(
        decode_exact(wire, V1),
        Message::LogicalMessage(LogicalMessage {
            xid: None,
            transactional: true,
            lsn: Lsn(0x1_0000_0000),
            prefix: "updog".into(),
            content: Bytes::from_static(b"\0\xffok"),
        })
    );
    let streamed = Wire::tag(b'M').u32(12).u8(0).u64(1).str("").i32(0);
    assert_eq!(decode_exact(streamed, V2_STREAM).streamed_xid(), Some(12));
    let err = decode_err(Wire::tag(b'M').u8(2).u64(1).str("").i32(0), V1);
    assert!(matches!(
        err.kind,
        DecodeErrorKind::BadByte {
            field: "message flags",
            found: 2,
            ..
        }
    ));
}

#[test]
fn stream_start_stop_commit_abort() {
    assert_eq!(
        decode_exact(Wire::tag(b'S').u32(900).u8(1), V2),
        Message::StreamStart(StreamStart {
            xid: 900,
            first_segment: true,
        })
    );
    assert_eq!(
        decode_exact(Wire::tag(b'S').u32(900).u8(0), V2),
        Message::StreamStart(StreamStart {
            xid: 900,
            first_segment: false,
        })
    );
    assert_eq!(
        decode_exact(Wire::tag(b'E'), V2_STREAM),
        Message::StreamStop
    );
    assert_eq!(
        decode_exact(Wire::tag(b'c').u32(900).u8(0).u64(30).u64(40).i64(50), V2),
        Message::StreamCommit(StreamCommit {
            xid: 900,
            flags: 0,
            commit_lsn: Lsn(30),
            end_lsn: Lsn(40),
            commit_time: PgTimestamp(50),
        })
    );
    assert_eq!(
        decode_exact(Wire::tag(b'A').u32(900).u32(901), V2),
        Message::StreamAbort(StreamAbort {
            xid: 900,
            subxid: 901,
        })
    );
    // Protocol 4 appends abort_lsn and abort_time; we never ask for it.
    let err = decode_err(Wire::tag(b'A').u32(900).u32(901).u64(1).i64(2), V2);
    assert_eq!(err.kind, DecodeErrorKind::TrailingBytes { count: 16 });
    assert_eq!(err.offset, 9);
    let err = decode_err(Wire::tag(b'S').u32(1).u8(2), V2);
    assert!(matches!(
        err.kind,
        DecodeErrorKind::BadByte { found: 2, .. }
    ));
}

#[test]
fn context_rules() {
    let refused = |wire: Wire, ctx| {
        let err = decode_err(wire, ctx);
        assert_eq!(err.offset, 0);
        assert!(
            matches!(err.kind, DecodeErrorKind::NotInContext(_)),
            "{err}"
        );
    };
    refused(Wire::tag(b'S').u32(1).u8(1), V1);
    refused(Wire::tag(b'E'), V1);
    refused(Wire::tag(b'c').u32(1).u8(0).u64(1).u64(2).i64(3), V1);
    refused(Wire::tag(b'A').u32(1).u32(1), V1);
    refused(Wire::tag(b'S').u32(1).u8(1), V2_STREAM);
    refused(Wire::tag(b'E'), V2);
    refused(Wire::tag(b'B').u64(1).i64(1).u32(1), V2_STREAM);
    refused(Wire::tag(b'C').u8(0).u64(1).u64(2).i64(3), V2_STREAM);
    refused(Wire::tag(b'A').u32(1).u32(1), V2_STREAM);
    refused(
        Wire::tag(b'O').u64(1).str("o"),
        Context {
            proto: ProtocolVersion::V1,
            in_stream: true,
        },
    );
}

#[test]
fn errors_name_tag_offset_and_problem() {
    let err = decode_err(Wire::default(), V1);
    assert_eq!(err.kind, DecodeErrorKind::Empty);

    let err = decode_err(Wire::tag(b'Z'), V1);
    assert_eq!(err.kind, DecodeErrorKind::UnknownTag);
    assert_eq!(
        err.to_string(),
        "pgoutput message with tag 'Z', at byte 0: unknown message tag"
    );
    let err = decode_err(Wire::tag(0x05), V1);
    assert!(err.to_string().contains("0x05"), "{err}");

    let err = decode_err(Wire::tag(b'B').u64(1).i64(2), V1);
    assert_eq!(
        err.to_string(),
        "pgoutput 'B' (Begin) message, at byte 17: truncated: xid needs 4 bytes, 0 left"
    );

    let err = decode_err(Wire::tag(b'O').u64(1).raw(b"no nul"), V1);
    assert_eq!(
        err.kind,
        DecodeErrorKind::Unterminated {
            field: "origin name"
        }
    );
    assert_eq!(err.offset, 9);

    let err = decode_err(Wire::tag(b'O').u64(1).raw(b"ab\xffc\0"), V1);
    assert_eq!(
        err.kind,
        DecodeErrorKind::InvalidUtf8 {
            field: "origin name"
        }
    );
    assert_eq!(err.offset, 11, "points at the first invalid byte");

    let err = decode_err(Wire::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'x'), V1);
    assert_eq!(err.kind, DecodeErrorKind::BadTupleKind { found: b'x' });
    assert_eq!(err.offset, 8);
    assert!(err.to_string().contains("Insert"), "{err}");

    let err = decode_err(Wire::tag(b'E').u8(0), V2_STREAM);
    assert_eq!(err.kind, DecodeErrorKind::TrailingBytes { count: 1 });
    assert_eq!(err.offset, 1);
}

#[test]
fn column_counts_are_bounded() {
    let err = decode_err(Wire::tag(b'I').u32(1).u8(b'N').i16(1665), V1);
    assert_eq!(err.kind, DecodeErrorKind::TooManyColumns { count: 1665 });
    // u16 on the wire: PostgreSQL writes uint16, so 0xFFFF is 65535 columns, not -1.
    let err = decode_err(Wire::tag(b'I').u32(1).u8(b'N').i16(-1), V1);
    assert_eq!(err.kind, DecodeErrorKind::TooManyColumns { count: 65_535 });
    // Within the maximum but more columns than bytes left.
    let err = decode_err(Wire::tag(b'I').u32(1).u8(b'N').i16(1000).u8(b'n'), V1);
    assert!(matches!(
        err.kind,
        DecodeErrorKind::Truncated {
            field: "columns",
            ..
        }
    ));
    let err = decode_err(
        Wire::tag(b'R')
            .u32(1)
            .str("")
            .str("t")
            .u8(b'f')
            .i16(3)
            .raw(&[0; 25]),
        V1,
    );
    assert!(matches!(
        err.kind,
        DecodeErrorKind::Truncated {
            field: "columns",
            ..
        }
    ));
}

#[test]
fn value_lengths_are_checked() {
    let err = decode_err(
        Wire::tag(b'I')
            .u32(1)
            .u8(b'N')
            .i16(1)
            .u8(b't')
            .i32(i32::MAX)
            .raw(b"abc"),
        V1,
    );
    assert_eq!(
        err.kind,
        DecodeErrorKind::Truncated {
            field: "text value",
            needed: i32::MAX as usize,
            remaining: 3,
        }
    );
    let err = decode_err(Wire::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'b').i32(-2), V1);
    assert!(matches!(
        err.kind,
        DecodeErrorKind::NegativeLength { value: -2, .. }
    ));
}
