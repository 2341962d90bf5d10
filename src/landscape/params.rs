//! The parameter space the landscape lives in: every float initializer of model A's graph,
//! flattened into one vector θ in graph order, and back.
//!
//! A merge with statistics repair may give a Conv or Gemm that had no bias a new bias
//! initializer (`<weight>.mudsc_repair_bias`). Such a merged model is still A's graph plus
//! those inputs, so the space is A's graph with the same bias inputs added: A and the aligned B
//! sit there with zero biases, which computes exactly what they compute without one. Any
//! other difference between the merged model's initializers and A's is an error, because then
//! the merged model is not a point of A's parameter space.

use std::collections::{HashMap, HashSet};

use ndarray::ArrayD;

use crate::error::{Error, Result};
use crate::onnx::proto::TensorProto;
use crate::onnx::{DataType, Model, TensorData};

/// One float initializer's place in θ.
#[derive(Clone, Debug)]
struct Slot {
    name: String,
    dtype: DataType,
    shape: Vec<usize>,
    offset: usize,
    /// Index of the initializer in the base graph.
    index: usize,
    /// Added for a repair bias: models without it hold zeros here.
    zero_when_absent: bool,
}

impl Slot {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The flat parameter vector of a graph, with the graph to write it back into.
#[derive(Clone, Debug)]
pub struct ParamSpace {
    base: Model,
    slots: Vec<Slot>,
    len: usize,
}

fn is_float(d: DataType) -> bool {
    matches!(
        d,
        DataType::F32 | DataType::F64 | DataType::F16 | DataType::BF16
    )
}

/// Float initializers of a model by name, with their dtype and shape (from the header: the
/// data is only decoded when θ is read).
fn float_headers(m: &Model) -> HashMap<&str, (DataType, Vec<usize>)> {
    m.graph()
        .initializer
        .iter()
        .filter_map(|t| {
            let d = DataType::from_onnx(t.data_type.unwrap_or(0))?;
            let shape = t.dims.iter().map(|&d| d.max(0) as usize).collect();
            Some((t.name.as_deref()?, (d, shape)))
        })
        .filter(|(_, (d, _))| is_float(*d))
        .collect()
}

impl ParamSpace {
    /// The space of model `a`'s graph, reconciled with the merged model `merged` (see the
    /// module doc): every float initializer of `a` must be in `merged` with the same dtype and
    /// shape, and `merged` may only add biases to Conv/Gemm nodes that have none in `a`.
    pub fn new(a: &Model, merged: &Model) -> Result<ParamSpace> {
        let (name_a, name_m) = (a.display_name(), merged.display_name());
        let in_m = float_headers(merged);
        let mut base = a.clone();
        let mut slots = Vec::new();
        let mut offset = 0;
        for (index, t) in a.graph().initializer.iter().enumerate() {
            let Some(dtype) =
                DataType::from_onnx(t.data_type.unwrap_or(0)).filter(|d| is_float(*d))
            else {
                continue;
            };
            let name = t.name.clone().unwrap_or_default();
            let shape: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
            match in_m.get(name.as_str()) {
                None => {
                    return Err(Error::Usage(format!(
                        "{name_m} has no float initializer '{name}' of {name_a}: the merged \
                         model must keep model A's initializer names (was it merged from A?)"
                    )))
                }
                Some((d, s)) if *d != dtype || *s != shape => {
                    return Err(Error::Usage(format!(
                        "initializer '{name}' is {} {:?} in {name_a} but {} {:?} in {name_m}",
                        dtype.name(),
                        shape,
                        d.name(),
                        s
                    )))
                }
                Some(_) => {}
            }
            let slot = Slot {
                name,
                dtype,
                shape,
                offset,
                index,
                zero_when_absent: false,
            };
            offset += slot.len();
            slots.push(slot);
        }
        let known: HashSet<&str> = slots.iter().map(|s| s.name.as_str()).collect();
        let mut extra: Vec<&str> = in_m
            .keys()
            .copied()
            .filter(|n| !known.contains(n))
            .collect();
        extra.sort_unstable();
        for name in extra {
            let (dtype, shape) = &in_m[name];
            add_bias_input(&mut base, merged, name).map_err(|why| {
                Error::Usage(format!(
                    "{name_m} has initializer '{name}' that {name_a} lacks ({why}): the merged \
                     model must have model A's graph"
                ))
            })?;
            let g = base.proto.graph.get_or_insert_with(Default::default);
            let zeros = to_tensor(*dtype, shape, &vec![0.0; shape.iter().product()])
                .map_err(|e| Error::tensor(name, e.to_string()))?;
            g.initializer.push(zeros.to_proto(name));
            let slot = Slot {
                name: name.to_string(),
                dtype: *dtype,
                shape: shape.clone(),
                offset,
                index: g.initializer.len() - 1,
                zero_when_absent: true,
            };
            offset += slot.len();
            slots.push(slot);
        }
        Ok(ParamSpace {
            base,
            slots,
            len: offset,
        })
    }

    /// Length of θ.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Names of the initializers that make up θ, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// θ of `model` (read by initializer name). Non-finite values are an error: no loss
    /// surface can be drawn through them.
    pub fn flatten(&self, model: &Model) -> Result<Vec<f64>> {
        let by_name: HashMap<&str, &TensorProto> = model
            .graph()
            .initializer
            .iter()
            .filter_map(|t| Some((t.name.as_deref()?, t)))
            .collect();
        let mut theta = Vec::with_capacity(self.len);
        for s in &self.slots {
            let Some(t) = by_name.get(s.name.as_str()) else {
                if s.zero_when_absent {
                    theta.extend(std::iter::repeat_n(0.0, s.len()));
                    continue;
                }
                return Err(Error::Usage(format!(
                    "{} has no initializer '{}'",
                    model.display_name(),
                    s.name
                )));
            };
            let values = match TensorData::from_proto(t)? {
                TensorData::F32(a) => a.mapv(f64::from),
                TensorData::F64(a) => a,
                TensorData::F16(a) => a.mapv(|v| f64::from(f32::from(v))),
                TensorData::BF16(a) => a.mapv(|v| f64::from(f32::from(v))),
                other => {
                    return Err(Error::tensor(
                        &s.name,
                        format!(
                            "is {} in {}, expected {}",
                            other.dtype().name(),
                            model.display_name(),
                            s.dtype.name()
                        ),
                    ))
                }
            };
            if values.shape() != s.shape.as_slice() {
                return Err(Error::tensor(
                    &s.name,
                    format!(
                        "has shape {:?} in {}, expected {:?}",
                        values.shape(),
                        model.display_name(),
                        s.shape
                    ),
                ));
            }
            if values.iter().any(|v| !v.is_finite()) {
                return Err(Error::tensor(
                    &s.name,
                    format!("holds NaN or infinite values in {}", model.display_name()),
                ));
            }
            theta.extend(values.iter().copied());
        }
        Ok(theta)
    }

    /// The base graph with θ written back, each initializer in its own dtype.
    pub fn model_at(&self, theta: &[f64]) -> Result<Model> {
        if theta.len() != self.len {
            return Err(Error::Usage(format!(
                "θ has {} values, the parameter space {}",
                theta.len(),
                self.len
            )));
        }
        let mut model = self.base.clone();
        let g = model.proto.graph.get_or_insert_with(Default::default);
        for s in &self.slots {
            let values = &theta[s.offset..s.offset + s.len()];
            let data = to_tensor(s.dtype, &s.shape, values)
                .map_err(|e| Error::tensor(&s.name, e.to_string()))?;
            let t = &mut g.initializer[s.index];
            *t = TensorProto {
                doc_string: t.doc_string.take(),
                ..data.to_proto(&s.name)
            };
        }
        Ok(model)
    }
}

/// An array of `dtype` holding `values` (rounded to that type).
fn to_tensor(
    dtype: DataType,
    shape: &[usize],
    values: &[f64],
) -> std::result::Result<TensorData, ndarray::ShapeError> {
    let shape = shape.to_vec();
    Ok(match dtype {
        DataType::F64 => TensorData::F64(ArrayD::from_shape_vec(shape, values.to_vec())?),
        DataType::F16 => TensorData::F16(ArrayD::from_shape_vec(
            shape,
            values.iter().map(|&v| half::f16::from_f64(v)).collect(),
        )?),
        DataType::BF16 => TensorData::BF16(ArrayD::from_shape_vec(
            shape,
            values.iter().map(|&v| half::bf16::from_f64(v)).collect(),
        )?),
        _ => TensorData::F32(ArrayD::from_shape_vec(
            shape,
            values.iter().map(|&v| v as f32).collect(),
        )?),
    })
}

/// Gives `base`'s node the bias input `name` that the same node of `merged` has, provided it
/// is input 2 of a Conv or Gemm that has no bias in `base`.
fn add_bias_input(base: &mut Model, merged: &Model, name: &str) -> std::result::Result<(), String> {
    let mn = &merged.graph().node;
    let g = base.proto.graph.get_or_insert_with(Default::default);
    if mn.len() != g.node.len() {
        return Err(format!(
            "the graphs have {} and {} nodes",
            mn.len(),
            g.node.len()
        ));
    }
    let users: Vec<usize> = mn
        .iter()
        .enumerate()
        .filter(|(_, n)| n.input.iter().any(|i| i == name))
        .map(|(k, _)| k)
        .collect();
    let [k] = users[..] else {
        return Err(format!("it is used by {} nodes, not one", users.len()));
    };
    let (m, b) = (&mn[k], &mut g.node[k]);
    let op = m.op_type.as_deref().unwrap_or("");
    let is_bias = matches!(op, "Conv" | "Gemm")
        && m.input.get(2).map(String::as_str) == Some(name)
        && b.op_type == m.op_type
        && b.output == m.output
        && b.input.get(..2) == m.input.get(..2)
        && b.input.get(2).is_none_or(String::is_empty);
    if !is_bias {
        return Err(format!(
            "it is not a bias added to a {op} node that has none in model A"
        ));
    }
    b.input.resize(3, String::new());
    b.input[2] = name.to_string();
    Ok(())
}
