use std::io::Write;
use std::process::Command;
use std::thread;

use super::*;
use crate::store::conformance;

fn temp_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[test]
fn conforms() {
    let dir = tempfile::tempdir().unwrap();
    let counter = std::sync::atomic::AtomicUsize::new(0);
    conformance::run_all(&|| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Arc::new(FileStore::new(temp_path(&dir, &format!("store{n}")), None).unwrap())
            as Arc<dyn Store>
    });
}

#[test]
fn writes_pytorchs_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_path(&dir, "spec");
    let s = FileStore::new(&path, Some(1)).unwrap();
    s.set("key", b"val").unwrap();
    s.add("cnt", 3).unwrap();
    s.add("cnt", 2).unwrap();
    s.delete_key("key").unwrap();
    s.append("ap", b"x").unwrap();
    s.append("ap", b"y").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), log::spec_example());
    assert_eq!(
        s.num_keys().unwrap(),
        3,
        "refcount/, /cnt and /ap, as PyTorch counts"
    );
    drop(s);
    assert!(
        !path.exists(),
        "the last of world_size handles removes the file"
    );
}

#[test]
fn refcount_and_removal_follow_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_path(&dir, "rc");
    let a = FileStore::new(&path, Some(2)).unwrap();
    let b = a.clone_store().unwrap();
    drop(a);
    assert!(path.exists());
    drop(b);
    assert!(!path.exists());
    // Without a world size the file stays.
    let path = temp_path(&dir, "kept");
    drop(FileStore::new(&path, None).unwrap());
    assert!(path.exists());
    // Fewer handles than the world size: the file stays for the others.
    let path = temp_path(&dir, "early");
    drop(FileStore::new(&path, Some(3)).unwrap());
    assert!(path.exists());
}

#[test]
fn bad_files_are_clear_errors_and_stay_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let e = FileStore::new(dir.path().join("missing/dir/store"), None)
        .err()
        .unwrap();
    assert_eq!(e.status(), Status::Io);
    assert!(
        e.message().contains("No such file or directory"),
        "{}",
        e.message()
    );
    let script = temp_path(&dir, "script.sh");
    std::fs::write(&script, b"#!/bin/sh\necho not a store\n").unwrap();
    let e = FileStore::new(&script, None).err().unwrap();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("not a FileStore log"));
    assert_eq!(
        std::fs::read(&script).unwrap(),
        b"#!/bin/sh\necho not a store\n"
    );
}

#[test]
fn a_truncated_last_record_is_ignored_then_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_path(&dir, "torn");
    let s = FileStore::new(&path, None).unwrap();
    s.set("good", b"1").unwrap();
    let whole = std::fs::metadata(&path).unwrap().len();
    // A writer dies in the middle of appending a record.
    let torn = record(b"/torn", b"never complete");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&torn[..10])
        .unwrap();
    assert!(!s.check(&["torn"]).unwrap());
    assert_eq!(s.get("good").unwrap(), b"1");
    // The next append cuts the torn bytes and the log stays readable.
    s.set("after", b"2").unwrap();
    let other = FileStore::new(&path, None).unwrap();
    assert_eq!(other.get("after").unwrap(), b"2");
    assert_eq!(other.get("good").unwrap(), b"1");
    assert!(std::fs::metadata(&path).unwrap().len() > whole);
}

#[test]
fn handles_see_each_other_and_waits_wake() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_path(&dir, "shared");
    let a = Arc::new(FileStore::new(&path, None).unwrap());
    let b = FileStore::new(&path, None).unwrap();
    let waiter = {
        let a = a.clone();
        thread::spawn(move || a.get("late"))
    };
    thread::sleep(Duration::from_millis(50));
    b.set("late", b"v").unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), b"v");
    b.queue_push("q", b"1").unwrap();
    assert_eq!(a.queue_len("q").unwrap(), 1);
    assert_eq!(a.queue_pop("q", true).unwrap(), b"1");
    assert_eq!(
        b.queue_pop("q", false).unwrap_err().status(),
        Status::QueueEmpty
    );
    assert_eq!(
        b.num_keys().unwrap(),
        2,
        "queues do not count, like PyTorch sees them"
    );
}

/// The child half of `processes_share_one_file`: runs when the test binary
/// is started with DISTCORE_FILESTORE_CHILD=path,rank.
#[test]
fn file_store_child_process() {
    let Ok(spec) = std::env::var("DISTCORE_FILESTORE_CHILD") else {
        return;
    };
    let (path, rank) = spec.split_once(',').unwrap();
    let rank: i64 = rank.parse().unwrap();
    let s = FileStore::new(path, Some(4)).unwrap();
    s.set_timeout(Duration::from_secs(60));
    for i in 0..50 {
        s.add("counter", 1).unwrap();
        s.set(&format!("r{rank}/{i}"), b"x").unwrap();
    }
    s.queue_push("results", rank.to_string().as_bytes())
        .unwrap();
    crate::store::elastic::barrier(&s, 4, "done", Duration::from_secs(60)).unwrap();
}

#[test]
fn processes_share_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = temp_path(&dir, "procs");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|rank| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "store::file::tests::file_store_child_process",
                    "--nocapture",
                ])
                .env(
                    "DISTCORE_FILESTORE_CHILD",
                    format!("{},{rank}", path.display()),
                )
                .spawn()
                .unwrap()
        })
        .collect();
    let s = FileStore::new(&path, Some(4)).unwrap();
    s.set_timeout(Duration::from_secs(60));
    crate::store::elastic::barrier(&s, 4, "done", Duration::from_secs(60)).unwrap();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    assert_eq!(s.get("counter").unwrap(), b"150");
    let mut ranks: Vec<_> = (0..3)
        .map(|_| s.queue_pop("results", false).unwrap())
        .collect();
    ranks.sort();
    assert_eq!(ranks, vec![b"0".to_vec(), b"1".to_vec(), b"2".to_vec()]);
    assert!(s.check(&["r2/49", "r0/0"]).unwrap());
    drop(s);
    assert!(!path.exists(), "four handles closed: the file is gone");
}
