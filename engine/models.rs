//! Models trained elsewhere: ONNX files loaded once with `tract-onnx` (pure Rust), optimised
//! for one row at a time, and shared read-only by every shard through a [`ModelCatalog`].
//!
//! A model is loaded from the models folder (`models = "models"` in `eddy.toml`, `--models`
//! for `eddy run`) or uploaded at run time (`PUT /models/NAME`, `eddy deploy --model FILE`).
//! Loading checks everything a query could get wrong later: the model must have one input, a
//! float tensor of shape `[n]` or `[N, n]` (the batch dimension is fixed to 1), outputs of
//! numbers or booleans, and at most `max_model_inputs` inputs and `max_model_outputs` output
//! values ([`Limits`]). Feature names come from the model's metadata: the key `features`,
//! a comma-separated list of the `n` input columns in order.
//!
//! In a query, `model("churn")` gives a handle to the current version of the model (an `Arc`),
//! and `predict(x)` runs it on one row: `x` is a map (or an event object) holding every named
//! feature, or an array of `n` numbers. The answer is a map of output name to value: a number
//! (or boolean) when the output holds one value per row, an array otherwise. A missing
//! feature, a wrong length or a non-number is a query error that says which. Inference runs
//! natively, outside the script's operation count; what bounds it is the size check at load
//! and the admin token needed to load a model. No model is ever fetched from the network.
//!
//! The catalog is swapped whole on every load or removal (`ArcSwap`), so shards read it
//! without a lock.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map, INT};
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::prelude::*;

use crate::query::valid_name;
use crate::sandbox::Limits;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model name {0:?} is not valid: use letters, digits, '_' and '-' (at most 64)")]
    BadName(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model `{name}`: not a model tract can load: {message}")]
    Onnx { name: String, message: String },
    #[error("model `{name}`: {message}")]
    Unsupported { name: String, message: String },
}

/// The element type of the model's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InputType {
    F32,
    F64,
}

/// One loaded model: its plan and what a query needs to call it.
pub struct Model {
    pub name: String,
    /// Input columns, by name when the model says (metadata `features`).
    pub features: Option<Vec<String>>,
    /// Number of input columns.
    pub width: usize,
    input: InputType,
    /// Shape of the input for one row: `[n]` or `[1, n]`.
    shape: Vec<usize>,
    /// Output names and number of values per row.
    pub outputs: Vec<(String, usize)>,
    /// Size of the ONNX file.
    pub bytes: usize,
    plan: Arc<TypedRunnableModel>,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("width", &self.width)
            .field("outputs", &self.outputs)
            .finish()
    }
}

fn onnx_err(name: &str, e: impl fmt::Display) -> ModelError {
    ModelError::Onnx {
        name: name.to_owned(),
        message: format!("{e:#}"),
    }
}

fn unsupported(name: &str, message: String) -> ModelError {
    ModelError::Unsupported {
        name: name.to_owned(),
        message,
    }
}

impl Model {
    /// Loads and optimises the ONNX model in `bytes`, checking it against `limits`.
    pub fn load(name: &str, bytes: &[u8], limits: &Limits) -> Result<Model, ModelError> {
        if !valid_name(name) {
            return Err(ModelError::BadName(name.to_owned()));
        }
        let onnx = tract_onnx::onnx();
        let proto = onnx
            .proto_model_for_read(&mut &bytes[..])
            .map_err(|e| onnx_err(name, e))?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| unsupported(name, "the file has no graph".into()))?;
        // Inputs that are initializers are weights, not inputs.
        let inputs: Vec<_> = graph
            .input
            .iter()
            .filter(|i| !graph.initializer.iter().any(|t| t.name == i.name))
            .collect();
        let [input] = inputs.as_slice() else {
            return Err(unsupported(
                name,
                format!("a model must have one input, this one has {}", inputs.len()),
            ));
        };
        let tensor = input
            .r#type
            .as_ref()
            .and_then(|t| t.value.as_ref())
            .map(|tract_onnx::pb::type_proto::Value::TensorType(t)| t)
            .ok_or_else(|| unsupported(name, format!("input `{}` is not a tensor", input.name)))?;
        let input_type = match DataType::try_from(tensor.elem_type) {
            Ok(DataType::Float) => InputType::F32,
            Ok(DataType::Double) => InputType::F64,
            _ => {
                return Err(unsupported(
                    name,
                    format!("input `{}` must hold float or double values", input.name),
                ))
            }
        };
        let dims: Vec<Option<i64>> = tensor
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match d.value {
                        Some(tract_onnx::pb::tensor_shape_proto::dimension::Value::DimValue(v)) => {
                            Some(v)
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (width, shape): (usize, Vec<usize>) = match dims.as_slice() {
            [Some(n)] => (*n as usize, vec![*n as usize]),
            [batch, Some(n)] if batch.is_none_or(|b| b == 1) => (*n as usize, vec![1, *n as usize]),
            _ => {
                return Err(unsupported(
                    name,
                    format!(
                    "input `{}` must have shape [n] or [batch, n] with a fixed n, found {dims:?}",
                    input.name
                ),
                ))
            }
        };
        if width == 0 || width > limits.max_model_inputs {
            return Err(unsupported(
                name,
                format!(
                    "the input has {width} columns; between 1 and {} are allowed (max_model_inputs)",
                    limits.max_model_inputs
                ),
            ));
        }
        let features = proto
            .metadata_props
            .iter()
            .find(|p| p.key == "features")
            .map(|p| {
                p.value
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .collect::<Vec<_>>()
            });
        if let Some(f) = &features {
            if f.len() != width {
                return Err(unsupported(
                    name,
                    format!(
                        "the metadata names {} features but the input has {width} columns",
                        f.len()
                    ),
                ));
            }
        }

        let mut model = onnx
            .model_for_proto_model(&proto)
            .map_err(|e| onnx_err(name, e))?;
        let fact = match input_type {
            InputType::F32 => f32::fact(shape.clone()),
            InputType::F64 => f64::fact(shape.clone()),
        };
        model
            .set_input_fact(0, fact.into())
            .map_err(|e| onnx_err(name, e))?;
        let typed = model.into_optimized().map_err(|e| onnx_err(name, e))?;
        let mut outputs = Vec::new();
        let mut total = 0;
        for (i, outlet) in typed
            .output_outlets()
            .map_err(|e| onnx_err(name, e))?
            .iter()
            .enumerate()
        {
            let fact = typed.outlet_fact(*outlet).map_err(|e| onnx_err(name, e))?;
            let oname = typed
                .outlet_label(*outlet)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("output_{i}"));
            if !matches!(
                fact.datum_type,
                DatumType::F32 | DatumType::F64 | DatumType::I64 | DatumType::I32 | DatumType::Bool
            ) {
                return Err(unsupported(
                    name,
                    format!(
                        "output `{oname}` holds {:?}; only numbers and booleans are supported",
                        fact.datum_type
                    ),
                ));
            }
            let len = fact
                .shape
                .as_concrete()
                .map(|s| s.iter().product::<usize>())
                .ok_or_else(|| {
                    unsupported(
                        name,
                        format!("output `{oname}` has no fixed shape for one row"),
                    )
                })?;
            total += len;
            outputs.push((oname, len));
        }
        if total > limits.max_model_outputs {
            return Err(unsupported(
                name,
                format!(
                    "the outputs hold {total} values per row, more than {} (max_model_outputs)",
                    limits.max_model_outputs
                ),
            ));
        }
        let plan = typed.into_runnable().map_err(|e| onnx_err(name, e))?;
        Ok(Model {
            name: name.to_owned(),
            features,
            width,
            input: input_type,
            shape,
            outputs,
            bytes: bytes.len(),
            plan,
        })
    }

    /// Runs the model on one row.
    pub fn run(&self, row: &[f64]) -> Result<Vec<Vec<Dynamic>>, String> {
        debug_assert_eq!(row.len(), self.width);
        let shape = &self.shape[..];
        let tensor = match self.input {
            InputType::F32 => {
                let v: Vec<f32> = row.iter().map(|&x| x as f32).collect();
                tract_ndarray::ArrayD::from_shape_vec(shape, v).map(Tensor::from)
            }
            InputType::F64 => {
                tract_ndarray::ArrayD::from_shape_vec(shape, row.to_vec()).map(Tensor::from)
            }
        }
        .map_err(|e| format!("model `{}`: {e}", self.name))?;
        let out = self
            .plan
            .run(tvec!(tensor.into()))
            .map_err(|e| format!("model `{}`: inference failed: {e:#}", self.name))?;
        out.iter()
            .map(|t| values(t).map_err(|e| format!("model `{}`: {e}", self.name)))
            .collect()
    }

    /// One row from a feature source: by name when the model names its features.
    fn row_from<X: eddy_plugins::Features>(
        &self,
        x: &X,
        ctx: &str,
    ) -> Result<Vec<f64>, Box<EvalAltResult>> {
        let Some(names) = &self.features else {
            return Err(format!(
                "{ctx}: model `{}` does not name its features (metadata `features`); pass an array of {} numbers",
                self.name, self.width
            )
            .into());
        };
        let mut row = vec![f64::NAN; self.width];
        x.each(ctx, &mut |name, v| {
            if let Some(i) = names.iter().position(|n| n == name) {
                row[i] = v;
            }
            Ok(())
        })?;
        if let Some(i) = row.iter().position(|v| v.is_nan()) {
            return Err(format!(
                "{ctx}: feature `{}` is missing (model `{}` takes {})",
                names[i],
                self.name,
                names.join(", ")
            )
            .into());
        }
        Ok(row)
    }

    fn row_from_array(&self, a: &Array, ctx: &str) -> Result<Vec<f64>, Box<EvalAltResult>> {
        if a.len() != self.width {
            return Err(format!(
                "{ctx}: model `{}` takes {} numbers, got an array of {}",
                self.name,
                self.width,
                a.len()
            )
            .into());
        }
        let mut row = Vec::with_capacity(a.len());
        let mut buf = itoa::Buffer::new();
        for (i, v) in a.iter().enumerate() {
            row.push(eddy_plugins::feature_value(v, ctx, buf.format(i))?);
        }
        Ok(row)
    }

    /// The outputs of one row as a Rhai map.
    fn predict_row(&self, row: &[f64]) -> Result<Map, Box<EvalAltResult>> {
        let values = self.run(row)?;
        Ok(self
            .outputs
            .iter()
            .zip(values)
            .map(|((name, _), mut v)| {
                let value = if v.len() == 1 {
                    v.pop().unwrap_or(Dynamic::UNIT)
                } else {
                    Dynamic::from_array(v)
                };
                (name.as_str().into(), value)
            })
            .collect())
    }
}

/// The values of an output tensor, flattened.
fn values(t: &TValue) -> Result<Vec<Dynamic>, String> {
    let out = match t.datum_type() {
        DatumType::F32 => t.to_plain_array_view::<f32>().map(|s| {
            s.iter()
                .map(|&x| Dynamic::from_float(f64::from(x)))
                .collect()
        }),
        DatumType::F64 => t
            .to_plain_array_view::<f64>()
            .map(|s| s.iter().map(|&x| Dynamic::from_float(x)).collect()),
        DatumType::I64 => t
            .to_plain_array_view::<i64>()
            .map(|s| s.iter().map(|&x| Dynamic::from_int(x as INT)).collect()),
        DatumType::I32 => t
            .to_plain_array_view::<i32>()
            .map(|s| s.iter().map(|&x| Dynamic::from_int(INT::from(x))).collect()),
        DatumType::Bool => t
            .to_plain_array_view::<bool>()
            .map(|s| s.iter().map(|&x| Dynamic::from_bool(x)).collect()),
        other => return Err(format!("an output holds {other:?}")),
    };
    out.map_err(|e| e.to_string())
}

/// The models queries may call, by name; cheap to clone, shared by every engine.
#[derive(Clone, Default)]
pub struct ModelCatalog(Arc<ArcSwap<HashMap<String, Arc<Model>>>>);

impl fmt::Debug for ModelCatalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

/// Two handles are equal when they share one catalog.
impl PartialEq for ModelCatalog {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ModelCatalog {}

impl ModelCatalog {
    /// The model called `name`, if loaded.
    pub fn get(&self, name: &str) -> Option<Arc<Model>> {
        self.0.load().get(name).cloned()
    }

    /// Every model, by name.
    pub fn models(&self) -> BTreeMap<String, Arc<Model>> {
        self.0
            .load()
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.models().into_keys().collect()
    }

    /// Adds or replaces a model; returns whether it replaced one.
    pub fn insert(&self, model: Model) -> bool {
        let model = Arc::new(model);
        let mut replaced = false;
        self.0.rcu(|map| {
            let mut next = HashMap::clone(map);
            replaced = next
                .insert(model.name.clone(), Arc::clone(&model))
                .is_some();
            next
        });
        replaced
    }

    /// Removes a model; returns whether it was there.
    pub fn remove(&self, name: &str) -> bool {
        let mut removed = false;
        self.0.rcu(|map| {
            let mut next = HashMap::clone(map);
            removed = next.remove(name).is_some();
            next
        });
        removed
    }

    /// Loads every `NAME.onnx` of `dir` (a missing folder holds no models); returns how many.
    pub fn load_dir(&self, dir: &Path, limits: &Limits) -> Result<usize, ModelError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(ModelError::Io {
                    path: dir.to_owned(),
                    source,
                })
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
            .collect();
        paths.sort();
        for path in &paths {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            self.insert(Model::load(name, &bytes, limits)?);
        }
        Ok(paths.len())
    }
}

/// A query's handle on one model (`model("churn")`).
#[derive(Clone)]
pub struct ModelRef(pub Arc<Model>);

fn predict_features<X: eddy_plugins::Features>(
    m: &mut ModelRef,
    x: X,
) -> Result<Map, Box<EvalAltResult>> {
    let ctx = format!("model(\"{}\").predict", m.0.name);
    let row = m.0.row_from(&x, &ctx)?;
    m.0.predict_row(&row)
}

/// Registers `model(name)` and the `model` type on a query engine.
pub(crate) fn register(engine: &mut Engine, catalog: &ModelCatalog) {
    let catalog = catalog.clone();
    engine
        .register_type_with_name::<ModelRef>("model")
        .register_fn(
            "model",
            move |name: &str| -> Result<ModelRef, Box<EvalAltResult>> {
                catalog.get(name).map(ModelRef).ok_or_else(|| {
                    let names = catalog.names();
                    format!(
                        "no model named `{name}` (loaded: {})",
                        if names.is_empty() {
                            "none".to_owned()
                        } else {
                            names.join(", ")
                        }
                    )
                    .into()
                })
            },
        )
        .register_fn("predict", predict_features::<Map>)
        .register_fn("predict", predict_features::<crate::event::Event>)
        .register_fn(
            "predict",
            |m: &mut ModelRef, a: Array| -> Result<Map, Box<EvalAltResult>> {
                let ctx = format!("model(\"{}\").predict", m.0.name);
                let row = m.0.row_from_array(&a, &ctx)?;
                m.0.predict_row(&row)
            },
        )
        .register_get("name", |m: &mut ModelRef| m.0.name.clone())
        .register_get("features", |m: &mut ModelRef| -> Array {
            match &m.0.features {
                Some(f) => f.iter().map(|s| Dynamic::from(s.clone())).collect(),
                None => Array::new(),
            }
        })
        .register_get("outputs", |m: &mut ModelRef| -> Array {
            m.0.outputs
                .iter()
                .map(|(n, _)| Dynamic::from(n.clone()))
                .collect()
        })
        .register_fn("to_string", |m: &mut ModelRef| {
            format!("model({:?})", m.0.name)
        })
        .register_fn("to_debug", |m: &mut ModelRef| {
            format!("model({:?})", m.0.name)
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn churn_bytes() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/ml/churn.onnx"
        ))
        .unwrap()
    }

    #[test]
    fn the_churn_model_loads_with_its_features_and_outputs() {
        let m = Model::load("churn", &churn_bytes(), &Limits::default()).unwrap();
        assert_eq!(m.width, 5);
        assert_eq!(
            m.features.as_deref().unwrap(),
            ["session_minutes", "kills", "deaths", "score", "sessions"]
        );
        assert_eq!(
            m.outputs,
            vec![("label".to_owned(), 1), ("probabilities".to_owned(), 2)]
        );
    }

    #[test]
    fn bad_models_are_refused_with_a_reason() {
        let limits = Limits::default();
        let e = Model::load("x", b"not a model", &limits).unwrap_err();
        assert!(matches!(e, ModelError::Onnx { .. }), "{e}");
        let e = Model::load("bad name", &churn_bytes(), &limits).unwrap_err();
        assert!(matches!(e, ModelError::BadName(_)), "{e}");
        let tight = Limits {
            max_model_inputs: 4,
            ..Limits::default()
        };
        let e = Model::load("churn", &churn_bytes(), &tight).unwrap_err();
        assert!(e.to_string().contains("max_model_inputs"), "{e}");
        let tight = Limits {
            max_model_outputs: 2,
            ..Limits::default()
        };
        let e = Model::load("churn", &churn_bytes(), &tight).unwrap_err();
        assert!(e.to_string().contains("max_model_outputs"), "{e}");
    }

    #[test]
    fn the_catalog_replaces_and_removes() {
        let limits = Limits::default();
        let c = ModelCatalog::default();
        assert!(!c.insert(Model::load("a", &churn_bytes(), &limits).unwrap()));
        assert!(c.insert(Model::load("a", &churn_bytes(), &limits).unwrap()));
        assert_eq!(c.names(), vec!["a"]);
        let shared = c.clone();
        assert!(shared.remove("a"));
        assert!(c.get("a").is_none());
        assert!(!c.remove("a"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m1.onnx"), churn_bytes()).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        assert_eq!(c.load_dir(dir.path(), &limits).unwrap(), 1);
        assert!(c.get("m1").is_some());
        assert_eq!(c.load_dir(&dir.path().join("absent"), &limits).unwrap(), 0);
        std::fs::write(dir.path().join("broken.onnx"), "x").unwrap();
        let e = c.load_dir(dir.path(), &limits).unwrap_err();
        assert!(e.to_string().contains("broken"), "{e}");
    }
}
