//! ONNX model I/O: round trips, external data, every dtype, and the error cases.

mod common;

use std::path::Path;

use common::{assert_close, model, ort_python_outputs};
use mudsc::onnx::{self, DataType, ExternalData, SaveOptions, TensorData};
use mudsc::Error;

fn initializers(m: &onnx::Model) -> Vec<(String, TensorData)> {
    m.graph()
        .initializer
        .iter()
        .map(|t| (t.name.clone().unwrap(), TensorData::from_proto(t).unwrap()))
        .collect()
}

/// Load → save → load gives the same graph with bit-identical initializers, and ONNX Runtime
/// (Python) runs the saved file with the same outputs as the original.
fn round_trip(path: &Path, input: &Path, options: &SaveOptions) {
    let original = onnx::load(path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let saved_path = dir.path().join("saved.onnx");
    original.save(&saved_path, options).unwrap();
    let saved = onnx::load(&saved_path).unwrap();

    let (a, b) = (initializers(&original), initializers(&saved));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(
            ta.to_raw_bytes(),
            tb.to_raw_bytes(),
            "initializer {na} changed"
        );
    }
    let strip = |m: &onnx::Model| {
        let mut g = m.graph().clone();
        g.initializer.clear();
        g
    };
    assert_eq!(strip(&original), strip(&saved), "graph structure changed");
    assert_eq!(original.proto.opset_import, saved.proto.opset_import);
    assert_eq!(original.proto.ir_version, saved.proto.ir_version);

    let want = ort_python_outputs(path, input);
    let got = ort_python_outputs(&saved_path, input);
    for ((n, w), (_, g)) in want.0.iter().zip(&got.0) {
        assert_close(g, w, &format!("{}: output {n}", path.display()));
    }
}

#[test]
fn round_trip_inline() {
    for (m, input) in [
        ("mlp.onnx", "mlp_input.npz"),
        ("convnet.onnx", "convnet_input.npz"),
        ("two_inputs.onnx", "two_inputs_input.npz"),
    ] {
        round_trip(&model(m), &model(input), &SaveOptions::default());
    }
}

#[test]
fn round_trip_every_fixture() {
    let fixtures = common::fixture_models();
    for (m, input) in &fixtures {
        round_trip(m, input, &SaveOptions::default());
    }
}

#[test]
fn decode_encode_is_byte_identical() {
    use prost::Message;
    for m in ["mlp.onnx", "convnet.onnx", "with_if.onnx", "dtypes.onnx"] {
        let bytes = std::fs::read(model(m)).unwrap();
        let loaded = onnx::load(model(m)).unwrap();
        assert_eq!(loaded.proto.encode_to_vec(), bytes, "{m}");
    }
}

#[test]
fn external_data_written_by_onnx_loads() {
    let ext = onnx::load(model("mlp_ext.onnx")).unwrap();
    let inline = onnx::load(model("mlp.onnx")).unwrap();
    assert_eq!(initializers(&ext), initializers(&inline));
    assert_eq!(ext.data_files.len(), 1);
}

#[test]
fn external_data_round_trip() {
    let options = SaveOptions {
        external_data: ExternalData::Always(Some("weights.bin".into())),
        protect: vec![],
    };
    round_trip(
        &model("convnet.onnx"),
        &model("convnet_input.npz"),
        &options,
    );

    // The external file really holds the weights and the model refers to it.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let m = onnx::load(model("convnet.onnx")).unwrap();
    m.save(&out, &options).unwrap();
    let data_len = std::fs::metadata(dir.path().join("weights.bin"))
        .unwrap()
        .len();
    assert!(
        data_len >= 16 * 3 * 3 * 3 * 4,
        "data file too small: {data_len}"
    );
    let proto_len = std::fs::metadata(&out).unwrap().len();
    assert!(
        proto_len < data_len,
        "weights were not moved out of the model"
    );
    // tract runs it too.
    let reloaded = onnx::load(&out).unwrap();
    let inputs = mudsc::data::read(&model("convnet_input.npz")).unwrap();
    let mut s = mudsc::runtime::open_session(
        mudsc::runtime::BackendKind::Tract,
        &reloaded,
        &[],
        &Default::default(),
    )
    .unwrap();
    let bound = mudsc::data::bind_inputs(&inputs, &reloaded, Path::new("x")).unwrap();
    let got = s.run(&bound).unwrap();
    let want = ort_python_outputs(&model("convnet.onnx"), &model("convnet_input.npz"));
    assert_close(&got[0], &want.0[0].1, "tract on external-data model");
}

#[test]
fn every_dtype_raw_and_typed() {
    let m = onnx::load(model("dtypes.onnx")).unwrap();
    let expected = mudsc::data::read_npz(&model("dtypes_expected.npz")).unwrap();
    let find = |name: &str| {
        let t = m
            .graph()
            .initializer
            .iter()
            .find(|t| t.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing"));
        TensorData::from_proto(t).unwrap()
    };
    let mut seen = std::collections::HashSet::new();
    for (name, want) in &expected.0 {
        for form in ["raw", "typed"] {
            let got = find(&format!("{name}_{form}"));
            seen.insert(got.dtype());
            assert_eq!(got.dtype().name(), name.as_str(), "{name}_{form} dtype");
            assert_eq!(got.shape(), want.shape());
            match (&got, want) {
                (TensorData::BF16(_) | TensorData::F16(_), _) => {
                    assert_eq!(got.to_f32(), want.to_f32(), "{name}_{form}")
                }
                _ => assert_eq!(&got, want, "{name}_{form}"),
            }
            // Our own encoding reads back bit-identically.
            let again = TensorData::from_proto(&got.to_proto("t")).unwrap();
            assert_eq!(again, got);
        }
    }
    assert_eq!(
        seen.len(),
        DataType::ALL.len(),
        "not every dtype was covered"
    );
}

fn expect_err(path: &Path) -> Error {
    match onnx::load(path) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string()),
                "message does not name the file: {msg}"
            );
            assert!(e.is_bad_input(), "{msg}");
            e
        }
    }
}

#[test]
fn bad_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(
        &garbage,
        b"this is certainly not a protobuf \xff\xff\xff\xff",
    )
    .unwrap();
    assert!(matches!(expect_err(&garbage), Error::NotOnnx { .. }));

    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    assert!(expect_err(&empty).to_string().contains("empty"));

    let bytes = std::fs::read(model("convnet.onnx")).unwrap();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(expect_err(&truncated), Error::NotOnnx { .. }));

    assert!(matches!(expect_err(dir.path()), Error::NotOnnx { .. }));

    let missing = dir.path().join("nope.onnx");
    assert!(matches!(onnx::load(&missing), Err(Error::Io { .. })));
}

#[test]
fn unsupported_ir_version_is_refused() {
    use prost::Message;
    let mut m = onnx::load(model("mlp.onnx")).unwrap();
    m.proto.ir_version = Some(99);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ir99.onnx");
    std::fs::write(&p, m.proto.encode_to_vec()).unwrap();
    let e = expect_err(&p);
    assert!(matches!(e, Error::Unsupported { .. }));
    assert!(e.to_string().contains("IR version 99"), "{e}");
}

#[test]
fn missing_or_short_external_data_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["mlp_ext.onnx", "mlp_ext.weights"] {
        std::fs::copy(model(f), dir.path().join(f)).unwrap();
    }
    let weights = dir.path().join("mlp_ext.weights");
    let len = std::fs::metadata(&weights).unwrap().len();
    // Truncated data file.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap();
    f.set_len(len / 2).unwrap();
    let e = expect_err(&dir.path().join("mlp_ext.onnx"));
    assert!(matches!(e, Error::ExternalData { .. }), "{e}");
    // Missing data file.
    std::fs::remove_file(&weights).unwrap();
    let e = expect_err(&dir.path().join("mlp_ext.onnx"));
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn external_location_outside_the_model_directory_is_refused() {
    use prost::Message;
    let mut m = onnx::load(model("mlp_ext.onnx")).unwrap();
    // Rebuild an external reference pointing outside the directory.
    let t = &mut m.proto.graph.as_mut().unwrap().initializer[0];
    t.raw_data = None;
    t.data_location = Some(1);
    t.external_data = vec![onnx::proto::StringStringEntryProto {
        key: Some("location".into()),
        value: Some("../../etc/passwd".into()),
    }];
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("escape.onnx");
    std::fs::write(&p, m.proto.encode_to_vec()).unwrap();
    let e = expect_err(&p);
    assert!(e.to_string().contains("relative path inside"), "{e}");
}

#[test]
fn save_never_overwrites_its_input_and_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.onnx");
    std::fs::copy(model("mlp.onnx"), &p).unwrap();
    let before = std::fs::read(&p).unwrap();
    let m = onnx::load(&p).unwrap();
    let e = m.save(&p, &SaveOptions::default()).unwrap_err();
    assert!(e.to_string().contains("refusing to overwrite"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
    // A save into a directory that does not exist fails and creates nothing.
    let bad = dir.path().join("no/such/dir/out.onnx");
    assert!(m.save(&bad, &SaveOptions::default()).is_err());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

/// `into_inputs` moves the file's arrays into the model's inputs: the same inputs, in the
/// graph's order, as `bind_inputs` copies, and the same refusal of a missing one.
#[test]
fn inputs_moved_out_of_the_arrays_are_the_bound_ones() {
    let m = onnx::load(model("two_inputs.onnx")).unwrap();
    let path = model("two_inputs_input.npz");
    let mut arrays = mudsc::data::read(&path).unwrap();
    // Stored b first: binding is by name, not by position.
    arrays.0.reverse();
    assert_eq!(arrays.0[0].0, "b");
    let copied = mudsc::data::bind_inputs(&arrays, &m, &path).unwrap();
    let moved = mudsc::data::into_inputs(arrays, &m, &path).unwrap();
    assert_eq!(moved.len(), 2);
    assert_eq!(moved, copied);
    let a = mudsc::data::read(&path).unwrap().get("a").unwrap().clone();
    assert_eq!(moved[0], a);
    let mut short = mudsc::data::read(&path).unwrap();
    short.take("b");
    let err = mudsc::data::into_inputs(short, &m, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no array for model input 'b'"), "{err}");
}
