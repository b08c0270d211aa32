//! Devices as the command line spells them: `cpu` or `cuda:N`.

use candle_core::{Device, DeviceLocation};

use crate::error::{Error, Result};

/// Opens `cpu` or `cuda:N` (the N-th GPU; needs a build with the `cuda` feature).
pub fn open(spec: &str) -> Result<Device> {
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let Some(ordinal) = spec
        .strip_prefix("cuda:")
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return Err(Error::Invalid(format!(
            "--device {spec}: use `cpu` or `cuda:N` (N the GPU's index, e.g. `cuda:0`)"
        )));
    };
    // Without the feature candle's stub would only say "not compiled with cuda support".
    if !cfg!(feature = "cuda") {
        return Err(Error::Invalid(format!(
            "--device {spec}: this locus was built without the `cuda` feature; rebuild with \
             `--features cuda` (see deploy/Dockerfile.cuda)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Invalid(format!("--device {spec}: {e}")))
}

/// `cpu` or `cuda:N`, as [`open`] spells it.
pub fn name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The device named by the `LOCUS_DEVICE` variable (`cpu` when unset): how benchmarks and the
/// reference tests are pointed at a GPU.
pub fn from_env() -> Result<Device> {
    open(&std::env::var("LOCUS_DEVICE").unwrap_or_else(|_| "cpu".into()))
}
