use super::*;

fn image(seed: u8) -> Vec<u8> {
    let mut mem = vec![0u8; 8 * PAGE_SIZE];
    mem[3 * PAGE_SIZE + 7] = seed;
    mem[7 * PAGE_SIZE] = seed.wrapping_add(1);
    mem
}

fn versions(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn save_verify_and_detect_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let mem = image(9);
    let m = save(dir.path(), &mem, b"st", 42, "sim:").unwrap();
    let (m2, d) = verify(dir.path()).unwrap();
    assert_eq!(m, m2);
    assert_eq!(d, Digest::of(&mem, b"st"));
    let ver = version_dir(dir.path()).unwrap();
    assert_eq!(fs::read(ver.join("memory.img")).unwrap(), mem);
    fs::write(ver.join("state.bin"), b"xx").unwrap();
    assert!(verify(dir.path()).is_err());
}

#[test]
fn a_new_save_replaces_the_old_version_and_leaves_only_it() {
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), &image(1), b"a", 1, "sim:").unwrap();
    save(dir.path(), &image(2), b"b", 2, "sim:").unwrap();
    assert_eq!(verify(dir.path()).unwrap().0.epoch, 2);
    let names = versions(dir.path());
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(names[0], CURRENT);
    assert!(is_version_name(&names[1]) && names[1].starts_with("v00000000000000000002"));
}

#[test]
fn an_older_layout_is_read_then_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let mem = image(3);
    // What castor wrote before versions: the three files at the top.
    let v = dir.path().join("old");
    save(&v, &mem, b"s", 5, "sim:").unwrap();
    let ver = version_dir(&v).unwrap();
    for f in LEGACY_FILES {
        fs::copy(ver.join(f), dir.path().join(f)).unwrap();
    }
    fs::remove_dir_all(&v).unwrap();
    assert_eq!(verify(dir.path()).unwrap().0.epoch, 5);
    save(dir.path(), &mem, b"s", 6, "sim:").unwrap();
    assert_eq!(verify(dir.path()).unwrap().0.epoch, 6);
    assert!(!dir.path().join("meta.json").exists());
}

#[test]
fn nothing_saved_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = verify(dir.path()).unwrap_err().to_string();
    assert!(e.contains("no current"), "{e}");
}

#[test]
fn a_current_pointing_elsewhere_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/etc", dir.path().join(CURRENT)).unwrap();
    let e = verify(dir.path()).unwrap_err().to_string();
    assert!(e.contains("not to a version"), "{e}");
}

#[test]
fn disk_images_are_saved_with_the_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = |d: &Path| fs::write(d.join("vda.img"), b"disk bytes");
    save_with(
        dir.path(),
        &image(4),
        b"s",
        7,
        "sim:",
        Some(&mut w),
        &mut |_| Ok(()),
    )
    .unwrap();
    let ver = version_dir(dir.path()).unwrap();
    assert_eq!(
        fs::read(ver.join(DISKS).join("vda.img")).unwrap(),
        b"disk bytes"
    );
}

/// Failing each step of a save leaves the old or the new complete replica
/// (old before the switch, new from it on), and the next save succeeds
/// and cleans up what the failed one left.
#[test]
fn a_save_failing_at_any_step_leaves_a_complete_replica() {
    for (i, fail) in Step::ALL.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (image(10), image(20));
        save(dir.path(), &old, b"old", 1, "sim:").unwrap();
        let mut w = |d: &Path| fs::write(d.join("vda.img"), b"disk");
        let r = save_with(
            dir.path(),
            &new,
            b"new",
            2,
            "sim:",
            Some(&mut w),
            &mut |s| {
                if s == *fail {
                    Err(io::Error::other("injected"))
                } else {
                    Ok(())
                }
            },
        );
        let (meta, d) = verify(dir.path()).unwrap_or_else(|e| panic!("after {fail:?}: {e}"));
        let switched = i
            >= Step::ALL
                .iter()
                .position(|s| *s == Step::SyncStateDirAfterSwitch)
                .unwrap();
        if switched {
            assert_eq!((meta.epoch, d), (2, Digest::of(&new, b"new")), "{fail:?}");
        } else {
            assert_eq!((meta.epoch, d), (1, Digest::of(&old, b"old")), "{fail:?}");
        }
        // Tidying up is not part of the save: only the steps up to the
        // switch's sync fail it.
        assert_eq!(r.is_err(), *fail != Step::RemoveOld, "{fail:?}: {r:?}");
        if let Err(e) = r {
            assert!(e.to_string().contains(&format!("{fail:?}")), "{e}");
        }
        save(dir.path(), &image(30), b"next", 3, "sim:").unwrap();
        assert_eq!(verify(dir.path()).unwrap().0.epoch, 3);
        assert_eq!(
            versions(dir.path()).len(),
            2,
            "{fail:?}: {:?}",
            versions(dir.path())
        );
    }
}
