//! Durability: the journal and checkpoints detect damage, and a real `locus serve` killed with
//! SIGKILL again and again loses no acknowledged batch.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use candle_core::{Device, Tensor};
use common::{fixture, spawn_serving};
use locus::client::Client;
use locus::learn::Doc;
use locus::model::{GroupId, Module};
use locus::proto::v1 as pb;
use locus::snapshot::Snapshot;
use locus::store::checkpoint::{self, Checkpoints, Meta};
use locus::store::journal::{self, Journal};
use locus::store::publish::Published;
use locus::store::{Durability, Store, StoreError};
use rand::{Rng, SeedableRng};

fn doc(text: &str) -> Doc {
    Doc {
        text: text.to_string(),
        spans: None,
    }
}

fn flip_byte(path: &Path, at: u64) {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x10]).unwrap();
}

/// Writes three records and returns the file and the byte offset where each record starts.
fn three_records(dir: &Path) -> (PathBuf, Vec<u64>) {
    let path = dir.join("journal.log");
    let (mut j, records, torn) = Journal::open(path.clone()).unwrap();
    assert!(records.is_empty() && torn == 0);
    let mut starts = Vec::new();
    for i in 0..3 {
        starts.push(fs::metadata(&path).unwrap().len());
        let seq = j
            .append(&format!("b{i}"), &[doc(&format!("document number {i}"))])
            .unwrap();
        assert_eq!(seq, i + 1);
    }
    (path, starts)
}

#[test]
fn journal_torn_tail_is_cut_and_appending_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = three_records(dir.path());
    let good = fs::metadata(&path).unwrap().len();
    // Half of a fourth record, as a crash in the middle of a write leaves it.
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"LJR1\x40\x00\x00\x00\x01\x02\x03\x04{\"seq\":4,\"batch")
        .unwrap();
    drop(f);
    let scan = journal::read(&path).unwrap();
    assert_eq!(scan.records.len(), 3);
    assert_eq!(scan.valid_len, good);
    assert!(scan.torn_bytes > 0);

    let (mut j, records, torn) = Journal::open(path.clone()).unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(torn, scan.torn_bytes);
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        good,
        "the torn tail is cut off"
    );
    assert_eq!(j.append("b3", &[doc("after the crash")]).unwrap(), 4);
    let ids: Vec<String> = journal::read(&path)
        .unwrap()
        .records
        .into_iter()
        .map(|r| r.batch_id)
        .collect();
    assert_eq!(ids, ["b0", "b1", "b2", "b3"]);
}

#[test]
fn journal_compaction_keeps_the_records_after_a_checkpoint_and_appending_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (path, starts) = three_records(dir.path());
    let (mut j, _, _) = Journal::open(path.clone()).unwrap();
    assert_eq!(j.compact(0).unwrap(), 0, "nothing is covered");
    assert_eq!(j.compact(2).unwrap(), starts[2]);
    assert_eq!(j.append("b3", &[doc("after compaction")]).unwrap(), 4);
    let seqs = |p: &Path| -> Vec<u64> {
        journal::read(p)
            .unwrap()
            .records
            .iter()
            .map(|r| r.seq)
            .collect()
    };
    assert_eq!(seqs(&path), [3, 4]);
    // Compacting everything leaves an empty journal that numbering goes on from.
    assert!(j.compact(4).unwrap() > 0);
    assert!(seqs(&path).is_empty());
    drop(j);
    // A temporary file from a compaction cut short by a crash is removed on open.
    fs::write(path.with_extension("tmp"), b"half").unwrap();
    let (mut j, records, _) = Journal::open(path.clone()).unwrap();
    assert!(records.is_empty());
    assert!(!path.with_extension("tmp").exists());
    j.skip_to(5);
    assert_eq!(j.append("b4", &[doc("later")]).unwrap(), 5);
}

#[test]
fn journal_bit_flips_are_detected() {
    // A flip in the last record is indistinguishable from a torn write: it is cut.
    let dir = tempfile::tempdir().unwrap();
    let (path, starts) = three_records(dir.path());
    let len = fs::metadata(&path).unwrap().len();
    flip_byte(&path, (starts[2] + len) / 2);
    let scan = journal::read(&path).unwrap();
    assert_eq!(scan.records.len(), 2);
    assert_eq!(scan.valid_len, starts[2]);

    // A flip in an earlier record, payload or header, is damage: cutting would lose later batches.
    for at in [starts[1] + 20, starts[1] + 5, starts[0]] {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = three_records(dir.path());
        flip_byte(&path, at);
        let before = fs::read(&path).unwrap();
        match Journal::open(path.clone()) {
            Err(StoreError::Corrupt { reason, .. }) => {
                assert!(reason.contains("good records resume"), "{reason}")
            }
            Err(e) => panic!("flip at {at}: unexpected error {e}"),
            Ok(_) => panic!("flip at {at}: damage inside the journal went unnoticed"),
        }
        assert_eq!(
            fs::read(&path).unwrap(),
            before,
            "a damaged journal is left as it is"
        );
    }
}

fn meta(version: u64, parent: Option<u64>) -> Meta {
    Meta {
        format: checkpoint::FORMAT,
        version,
        parent,
        base_hash: "base".into(),
        strategy: "full".into(),
        selection: vec!["0.attn".into()],
        groups: vec!["0.attn".into(), "1.mlp".into()],
        journal_seq: version * 2,
        created_unix: 0,
        learner: None,
        step: None,
        recent: Vec::new(),
    }
}

fn tensors(fill: f32) -> BTreeMap<String, Tensor> {
    let t = |n: usize| Tensor::full(fill, (n, 3), &Device::Cpu).unwrap();
    BTreeMap::from([
        ("a.weight".to_string(), t(2)),
        ("b.weight".to_string(), t(4)),
    ])
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn checkpoint_round_trip_and_retention() {
    let dir = tempfile::tempdir().unwrap();
    let c = Checkpoints::open(dir.path().join("checkpoints")).unwrap();
    for v in 1..=4 {
        c.write(
            &meta(v, v.checked_sub(1).filter(|&p| p > 0)),
            &tensors(v as f32),
        )
        .unwrap();
    }
    let (found, rejected) = c.newest_good(&Device::Cpu).unwrap();
    let found = found.unwrap();
    assert!(rejected.is_empty());
    assert_eq!(found.meta, meta(4, Some(3)));
    assert_eq!(
        found.meta.group_ids(),
        [
            GroupId {
                layer: 0,
                module: Module::Attn
            },
            GroupId {
                layer: 1,
                module: Module::Mlp
            }
        ]
    );
    assert_eq!(values(&found.tensors["b.weight"]), vec![4.0; 12]);
    let removed = c.prune(2).unwrap();
    assert_eq!(removed, [c.path_of(2), c.path_of(1)]);
    let left: Vec<u64> = c.list().unwrap().into_iter().map(|(v, _)| v).collect();
    assert_eq!(left, [4, 3]);

    // A temporary file from a crash in the middle of a write is cleared on open.
    fs::write(c.path_of(5).with_extension("tmp"), b"half").unwrap();
    let c = Checkpoints::open(dir.path().join("checkpoints")).unwrap();
    assert!(!c.path_of(5).with_extension("tmp").exists());
}

#[test]
fn a_checkpoint_written_tensor_by_tensor_is_the_encoded_file_with_a_standard_safetensors_section() {
    let dir = tempfile::tempdir().unwrap();
    let c = Checkpoints::open(dir.path().join("checkpoints")).unwrap();
    let mut mixed = tensors(1.5);
    mixed.insert(
        "steps".into(),
        Tensor::new(&[3u32, 1, 4], &Device::Cpu).unwrap(),
    );
    mixed.insert(
        "0.mlp.state".into(),
        Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 6))
            .unwrap(),
    );
    let m = meta(7, Some(6));
    let (path, bytes) = c.write(&m, &mixed).unwrap();
    let file = fs::read(&path).unwrap();
    assert_eq!(bytes, file.len() as u64);
    assert_eq!(file, checkpoint::encode(&m, &mixed).unwrap());
    // The tensors section is what the safetensors library writes, so files stay readable by
    // any safetensors reader and by servers that wrote them whole.
    let standard = safetensors::serialize(mixed.iter(), None).unwrap();
    assert!(file
        .windows(standard.len())
        .any(|w| w == standard.as_slice()));
    let back = checkpoint::load(&path, &Device::Cpu).unwrap();
    assert_eq!(back.meta, m);
    assert_eq!(
        values(&back.tensors["0.mlp.state"]),
        (0..12).map(|i| i as f32).collect::<Vec<_>>()
    );
    assert_eq!(
        back.tensors["steps"].to_vec1::<u32>().unwrap(),
        vec![3, 1, 4]
    );
}

#[test]
fn readers_read_published_checkpoints_only_when_newer_than_what_they_serve() {
    let data = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let published = Published::open(store.path().to_str().unwrap()).unwrap();
    let local = Checkpoints::open(data.path().join("checkpoints")).unwrap();
    for v in [2, 3] {
        let (path, _) = local.write(&meta(v, None), &tensors(v as f32)).unwrap();
        published.checkpoint(&path, v, 2).unwrap();
    }
    let found = |after: u64| {
        let listing = published.list().unwrap();
        published
            .newest_checkpoint_after(&listing, after, &Device::Cpu)
            .unwrap()
    };
    assert_eq!(found(1).0.unwrap().meta.version, 3);
    // Damage the newest copy: a reader already serving it polls without reading it; one behind
    // it reports the damage and takes the older checkpoint.
    let newest = store.path().join(format!("checkpoints/{:020}.ckpt", 3));
    fs::write(&newest, b"damaged").unwrap();
    let (none, errors) = found(3);
    assert!(none.is_none() && errors.is_empty(), "{errors:?}");
    let (older, errors) = found(1);
    assert_eq!(older.unwrap().meta.version, 2);
    assert_eq!(errors.len(), 1);
    let (none, errors) = found(2);
    assert!(none.is_none() && errors.len() == 1);
}

#[test]
fn damaged_checkpoint_falls_back_to_the_previous_good_one() {
    for damage in ["truncate", "flip", "empty"] {
        let dir = tempfile::tempdir().unwrap();
        let c = Checkpoints::open(dir.path().join("checkpoints")).unwrap();
        c.write(&meta(1, None), &tensors(1.0)).unwrap();
        c.write(&meta(2, Some(1)), &tensors(2.0)).unwrap();
        let newest = c.path_of(2);
        let len = fs::metadata(&newest).unwrap().len();
        match damage {
            "truncate" => OpenOptions::new()
                .write(true)
                .open(&newest)
                .unwrap()
                .set_len(len - 7)
                .unwrap(),
            "flip" => flip_byte(&newest, len / 2),
            _ => fs::write(&newest, b"").unwrap(),
        }
        assert!(matches!(
            checkpoint::load(&newest, &Device::Cpu),
            Err(StoreError::Corrupt { .. })
        ));
        let (found, rejected) = c.newest_good(&Device::Cpu).unwrap();
        let found = found.unwrap();
        assert_eq!(found.meta.version, 1, "{damage}");
        assert_eq!(values(&found.tensors["a.weight"]), vec![1.0; 6]);
        assert_eq!(rejected, [newest.with_extension("corrupt")], "{damage}");
        assert!(!newest.exists());
    }
}

fn load_model(name: &str) -> locus::model::Model {
    locus::model::load::load(fixture(name).to_str().unwrap(), &Device::Cpu).unwrap()
}

#[test]
fn store_restores_changed_groups_into_the_model_and_checks_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let durability = Durability {
        dir: dir.path().to_path_buf(),
        checkpoint_every: 0,
        keep_checkpoints: 2,
    };
    let model = Arc::new(load_model("llama"));
    let (name, var) = model
        .vars
        .iter()
        .find(|(n, _)| n.contains("layers.1.mlp"))
        .unwrap();
    let base = values(var.as_tensor());
    let (mut store, restored) = Store::open(durability.clone(), &model, "full").unwrap();
    assert!(restored.checkpoint.is_none() && restored.replay.is_empty());
    match Store::open(durability.clone(), &model, "full") {
        Err(StoreError::Mismatch(m)) => assert!(m.contains("another locus serve"), "{m}"),
        _ => panic!("a data directory in use was opened twice"),
    }
    for i in 0..3 {
        store
            .journal(&format!("b{i}"), &[doc("a new fact")])
            .unwrap();
    }
    // As if the first two batches had been learned: layer 1's MLP changed.
    var.set(&(var.as_tensor() + 1.0).unwrap()).unwrap();
    store.updated([GroupId {
        layer: 1,
        module: Module::Mlp,
    }]);
    store.applied(2);
    let snapshot = Snapshot::load(Arc::clone(&model), 2).unwrap();
    let written = store.checkpoint(&snapshot, &[], None, Vec::new()).unwrap();
    assert_eq!(written.meta.journal_seq, 2);
    assert_eq!(written.meta.groups, ["1.mlp"]);
    let saved = checkpoint::load(&written.path, &Device::Cpu).unwrap();
    assert!(saved.tensors.keys().all(|n| n.contains("layers.1.mlp")));
    drop(store);

    let fresh = load_model("llama");
    let (_, restored) = Store::open(durability.clone(), &fresh, "full").unwrap();
    assert_eq!(restored.version, 2);
    let replay: Vec<String> = restored.replay.iter().map(|r| r.batch_id.clone()).collect();
    assert_eq!(
        replay,
        ["b2"],
        "only the record after the checkpoint is replayed"
    );
    let restored_values = values(fresh.vars[name].as_tensor());
    assert_eq!(
        restored_values,
        base.iter().map(|v| v + 1.0).collect::<Vec<_>>()
    );

    // The same data directory under another model is refused.
    match Store::open(durability, &load_model("gpt2"), "full") {
        Err(StoreError::Mismatch(m)) => assert!(m.contains("hash"), "{m}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a checkpoint of another model was accepted"),
    }
}

/// A `locus serve` process on the tiny model.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(data: &Path) -> Server {
        Server::spawn(Some(data), data.parent().unwrap())
    }

    /// Without a data directory it keeps everything in memory; `cwd` holds no `locus.toml`.
    fn spawn(data: Option<&Path>, cwd: &Path) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_locus"));
        command.args(["serve", "--model"]).arg(fixture("llama"));
        if let Some(data) = data {
            command.arg("--data-dir").arg(data);
        }
        command
            .args(["--grpc-addr", "127.0.0.1:0"])
            // Every step applies (no selection that could come out empty), one step per batch.
            .args(["--strategy", "full", "--batch-size", "8", "--lr", "1e-3"])
            .args(["--checkpoint-every", "3", "--keep-checkpoints", "2"])
            .env("RUST_LOG", "warn")
            .env_remove("LOCUS_CONFIG")
            .env_remove("LOCUS_DATA_DIR")
            .current_dir(cwd);
        let (child, addr) = spawn_serving(&mut command);
        Server { child, addr }
    }

    /// Connects once the model is loaded and restored.
    async fn client(&mut self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut c) = Client::connect(&self.addr, None).await {
                if c.info().await.is_ok() {
                    return c;
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("locus serve exited with {status}");
            }
            assert!(Instant::now() < deadline, "the server did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(mut self) {
        // SIGKILL: no shutdown code runs.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn terminate(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "graceful shutdown failed: {status}");
    }
}

fn batch(n: usize) -> pb::IngestRequest {
    let doc = |text: String| pb::Document {
        text,
        ..Default::default()
    };
    pb::IngestRequest {
        documents: vec![
            doc(format!(
                "Report {n}: the harbour of Vellmar opened pier {n} in spring."
            )),
            doc(format!(
                "Pier {n} of Vellmar handles grain and timber ships."
            )),
        ],
        client_batch_id: format!("b{n}"),
    }
}

/// Checks the data directory while the server runs and no batch is in flight: the journal holds
/// the records after the oldest kept checkpoint, numbered without gaps up to the served version
/// (one applied step per journaled batch), every acknowledged batch is in it or older than its
/// first record (batch numbers only grow), and every checkpoint verifies.
fn check_data_dir(data: &Path, acked: &[String], version: u64) {
    let scan = journal::read(&data.join("journal.log")).unwrap();
    assert_eq!(scan.torn_bytes, 0, "the torn tail was cut on restart");
    let seqs: Vec<u64> = scan.records.iter().map(|r| r.seq).collect();
    let covered = seqs.first().map_or(version, |first| first - 1);
    assert_eq!(
        seqs,
        (covered + 1..=version).collect::<Vec<_>>(),
        "one applied step per journaled batch"
    );
    let number = |id: &str| id[1..].parse::<usize>().unwrap();
    let journaled: std::collections::BTreeSet<usize> =
        scan.records.iter().map(|r| number(&r.batch_id)).collect();
    let first = journaled.first().copied().unwrap_or(usize::MAX);
    for id in acked {
        assert!(
            journaled.contains(&number(id)) || number(id) < first,
            "acknowledged batch {id} is lost"
        );
    }
    let oldest_kept = Checkpoints::open(data.join("checkpoints"))
        .unwrap()
        .list()
        .unwrap()
        .last()
        .map(|(_, path)| checkpoint::read_meta(path).unwrap().journal_seq);
    assert!(
        covered <= oldest_kept.unwrap_or(0),
        "records {covered} and before are gone, but the oldest checkpoint covers {oldest_kept:?}"
    );
    let dir = data.join("checkpoints");
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let ext = path.extension().unwrap().to_str().unwrap().to_string();
        assert_eq!(ext, "ckpt", "{} left behind", path.display());
        let c = checkpoint::load(&path, &Device::Cpu).unwrap();
        assert!(c.meta.version <= version && c.meta.journal_seq <= version);
    }
}

async fn probe(client: &mut Client) -> f64 {
    let r = client
        .score(
            "The harbour of Vellmar opened pier",
            &[" 7 in spring.".into()],
        )
        .await
        .unwrap();
    r.ranked[0].logprob
}

#[test]
fn killed_server_loses_no_acknowledged_batch() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let mut rng = rand::rngs::StdRng::seed_from_u64(20261126);
        let acked = Arc::new(Mutex::new(Vec::<String>::new()));
        let mut next = 0usize;
        let mut last_version = 0;
        let kills = 22;
        for round in 0..kills {
            let mut server = Server::start(&data);
            let mut client = server.client().await;
            let version = client.info().await.unwrap().version;
            assert!(
                version >= last_version,
                "round {round}: version went back from {last_version} to {version}"
            );
            check_data_dir(&data, &acked.lock().unwrap(), version);
            last_version = version;

            // Stream batches and kill the server at a random moment while they flow.
            let first = next;
            next += 1000;
            let mut stream_client = client.clone();
            let sink = Arc::clone(&acked);
            let streaming = tokio::spawn(async move {
                let batches = tokio_stream::iter((first..first + 1000).map(batch));
                let Ok(mut answers) = stream_client.ingest(batches).await else {
                    return;
                };
                while let Ok(Some(answer)) = answers.message().await {
                    sink.lock().unwrap().push(answer.client_batch_id);
                }
            });
            let wait = rng.random_range(0..250);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            server.kill();
            streaming.await.unwrap();
        }
        let acked = acked.lock().unwrap().clone();
        eprintln!(
            "{kills} kills: {} batches acknowledged, {last_version} journaled and learned",
            acked.len()
        );
        assert!(
            acked.len() >= kills,
            "only {} batches acknowledged in {kills} rounds",
            acked.len()
        );

        // Restoring is deterministic: two restarts over the same data directory give the same model.
        let mut server = Server::start(&data);
        let mut client = server.client().await;
        let version = client.info().await.unwrap().version;
        assert!(version >= last_version);
        check_data_dir(&data, &acked, version);
        let kept = journal::read(&data.join("journal.log")).unwrap().records;
        assert!(
            kept.first().is_none_or(|r| r.seq > 1),
            "checkpoints compacted the journal"
        );
        let first = probe(&mut client).await;
        server.kill();
        let mut server = Server::start(&data);
        let mut client = server.client().await;
        assert_eq!(client.info().await.unwrap().version, version);
        let again = probe(&mut client).await;
        assert!((first - again).abs() < 1e-4, "{first} vs {again}");

        // A graceful stop checkpoints everything, so the next start has nothing to replay.
        server.terminate();
        let newest = Checkpoints::open(data.join("checkpoints"))
            .unwrap()
            .newest_good(&Device::Cpu)
            .unwrap()
            .0
            .unwrap();
        assert_eq!(newest.meta.version, version);
        assert_eq!(newest.meta.journal_seq, version);
        let mut server = Server::start(&data);
        let mut client = server.client().await;
        assert_eq!(client.info().await.unwrap().version, version);
        let restored = probe(&mut client).await;
        assert!((first - restored).abs() < 1e-4, "{first} vs {restored}");

        // Admin.Checkpoint writes the served version on request.
        let mut admin = pb::admin_client::AdminClient::connect(format!("http://{}", server.addr))
            .await
            .unwrap();
        let written = admin
            .checkpoint(pb::CheckpointRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!((written.version, written.journal_seq), (version, version));
        assert_eq!(written.parent, Some(version));
        assert!(Path::new(&written.path).is_file());
        server.kill();
    });
}

#[test]
fn checkpoint_without_a_data_directory_is_refused() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let cwd = tempfile::tempdir().unwrap();
        let mut server = Server::spawn(None, cwd.path());
        server.client().await;
        let mut admin = pb::admin_client::AdminClient::connect(format!("http://{}", server.addr))
            .await
            .unwrap();
        let status = admin
            .checkpoint(pb::CheckpointRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("--data-dir"),
            "{}",
            status.message()
        );
        server.kill();
    });
}

/// The weights of `model`, by name, as exact bits.
fn weight_bits(model: &locus::model::Model) -> BTreeMap<String, Vec<u32>> {
    model
        .vars
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                values(v.as_tensor()).iter().map(|x| x.to_bits()).collect(),
            )
        })
        .collect()
}

#[test]
fn learning_resumed_from_a_checkpoint_matches_learning_never_stopped() {
    use locus::learn::{LearnConfig, Learner, Localization, Strategy};
    let config = LearnConfig {
        strategy: Strategy::parse("tgl-fp").unwrap(),
        localization: Localization::PerBatch {
            ema: 0.5,
            reselect_every: 1,
        },
        lr: 1e-2,
        ..LearnConfig::default()
    };
    let batches: Vec<Vec<Doc>> = [
        "On 3 May 2021, Ada Lovelace opened a museum in London.",
        "The new museum director, Ada Lovelace, spoke on 4 May 2021.",
        "Charles Babbage's engines drew crowds to the museum in 2022.",
    ]
    .iter()
    .map(|t| vec![doc(t)])
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let durability = Durability {
        dir: dir.path().to_path_buf(),
        checkpoint_every: 0,
        keep_checkpoints: 1,
    };

    // Two steps, a checkpoint with the learner's state, then the third step.
    let model = Arc::new(load_model("llama"));
    let (mut store, _) = Store::open(durability.clone(), &model, "tgl-fp").unwrap();
    let mut learner = Learner::new(Arc::clone(&model), config.clone(), vec![], 0).unwrap();
    for b in &batches[..2] {
        let report = learner.step(b).unwrap();
        assert!(report.applied);
        store.updated(report.groups.iter().map(|g| g.id()));
    }
    let snapshot = Snapshot::load(Arc::clone(&model), learner.version()).unwrap();
    let state = learner.export_state().unwrap();
    assert!(!state.moments.is_empty() && state.norms.is_some());
    let written = store
        .checkpoint(
            &snapshot,
            learner.selection().unwrap_or_default(),
            Some(&state),
            Vec::new(),
        )
        .unwrap();
    let saved = checkpoint::load(&written.path, &Device::Cpu).unwrap();
    assert!(
        saved.tensors.keys().all(|n| !n.starts_with("optimizer/")),
        "optimizer moments are not weights"
    );
    assert_eq!(
        saved.learner.as_ref().unwrap().moments.len(),
        state.moments.len()
    );
    drop(store);
    learner.step(&batches[2]).unwrap();

    // A fresh process: base weights, the checkpoint and its learner state, the same third step.
    let fresh = Arc::new(load_model("llama"));
    let (_, restored) = Store::open(durability, &fresh, "tgl-fp").unwrap();
    let mut resumed = Learner::new(Arc::clone(&fresh), config, vec![], restored.version).unwrap();
    resumed.import_state(restored.learner.unwrap()).unwrap();
    let report = resumed.step(&batches[2]).unwrap();
    assert!(report.applied);
    assert_eq!(resumed.version(), learner.version());
    assert_eq!(resumed.selection(), learner.selection());
    assert_eq!(
        weight_bits(&fresh),
        weight_bits(&model),
        "resumed learning must take exactly the step uninterrupted learning took"
    );
}
