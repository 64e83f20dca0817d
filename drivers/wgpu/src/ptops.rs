//! Host requests on page-table entries that must be atomic with respect to
//! running kernels (read, clear accessed/dirty), run as a compute pass on
//! the device's queue (`pt_ops.wgsl`).

use hmm_core::mirror::backend::{BackendError, PteLoc};
use hmm_core::mirror::format::Pte;
use hmm_shaders::{pt_binding, PtBatch, PtParams};

use crate::device::{storage_entry as storage, uniform_entry, WgpuDevice};
use crate::other;

/// The pipeline and its buffers, grown on demand.
pub(crate) struct PtOps {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    params: wgpu::Buffer,
    bufs: Option<PtBufs>,
}

struct PtBufs {
    cap: u32,
    list: wgpu::Buffer,
    out: wgpu::Buffer,
    readback: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
}

impl PtOps {
    pub(crate) fn new(dev: &WgpuDevice) -> PtOps {
        let layout = dev
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("hmm pt ops"),
                entries: &[
                    uniform_entry(pt_binding::PARAMS),
                    storage(pt_binding::PAGE_TABLE, false),
                    storage(pt_binding::LIST, true),
                    storage(pt_binding::OUT, false),
                ],
            });
        let pl = dev
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("hmm pt ops"),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let module = dev
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("hmm pt ops"),
                source: wgpu::ShaderSource::Wgsl(hmm_shaders::PT_OPS.into()),
            });
        let pipeline = dev
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("hmm pt ops"),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(hmm_shaders::PT_AND_ENTRY),
                compilation_options: Default::default(),
                cache: None,
            });
        let params = dev.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("hmm pt params"),
            size: core::mem::size_of::<PtParams>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        PtOps {
            pipeline,
            layout,
            params,
            bufs: None,
        }
    }

    fn bufs(&mut self, dev: &WgpuDevice, need: u32) -> Result<&PtBufs, BackendError> {
        if self.bufs.as_ref().is_none_or(|b| b.cap < need) {
            let cap = need.next_power_of_two().max(256);
            let table = &dev.memory()?.table;
            let mk = |label, size, usage| {
                dev.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size,
                    usage,
                    mapped_at_creation: false,
                })
            };
            use wgpu::BufferUsages as U;
            let list = mk("hmm pt list", u64::from(cap) * 4, U::STORAGE | U::COPY_DST);
            let out = mk("hmm pt out", u64::from(cap) * 8, U::STORAGE | U::COPY_SRC);
            let readback = mk(
                "hmm pt read-back",
                u64::from(cap) * 8,
                U::MAP_READ | U::COPY_DST,
            );
            let bind_group = dev.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("hmm pt ops"),
                layout: &self.layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: pt_binding::PARAMS,
                        resource: self.params.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: pt_binding::PAGE_TABLE,
                        resource: table.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: pt_binding::LIST,
                        resource: list.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: pt_binding::OUT,
                        resource: out.as_entire_binding(),
                    },
                ],
            });
            self.bufs = Some(PtBufs {
                cap,
                list,
                out,
                readback,
                bind_group,
            });
        }
        self.bufs.as_ref().ok_or_else(|| other("pt buffers"))
    }
}

impl WgpuDevice {
    /// ANDs `keep` into the low word of each entry (`u32::MAX`: read only)
    /// and appends the previous values to `out`. Runs inside the calling
    /// method's error scopes (`WgpuDevice::scoped`).
    pub(crate) fn pt_and(
        &self,
        locs: &[PteLoc],
        keep: u32,
        out: &mut Vec<Pte>,
    ) -> Result<(), BackendError> {
        let mem = self.memory()?;
        if locs.is_empty() {
            return Ok(());
        }
        PtBatch::check(locs, (mem.table.size() / 4096) as u32)?;
        let mut guard = self.pt_ops.lock().unwrap_or_else(|p| p.into_inner());
        let ops = guard
            .as_mut()
            .ok_or(BackendError::NotInitialised("init has not run"))?;
        for piece in locs.chunks(PtBatch::MAX) {
            let PtBatch {
                words,
                params,
                groups_x: gx,
                groups_y: gy,
            } = PtBatch::plan(piece, keep);
            let n = params.count;
            self.queue
                .write_buffer(&ops.params, 0, bytemuck::bytes_of(&params));
            let pipeline = ops.pipeline.clone();
            let b = ops.bufs(self, n)?;
            self.queue
                .write_buffer(&b.list, 0, bytemuck::cast_slice(&words));
            let mut enc = self.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &b.bind_group, &[]);
                pass.dispatch_workgroups(gx, gy, 1);
            }
            let bytes = u64::from(n) * 8;
            enc.copy_buffer_to_buffer(&b.out, 0, &b.readback, 0, bytes);
            let index = self.queue.submit([enc.finish()]);
            self.count_submit();
            self.map_after(&b.readback, bytes, index)?;
            {
                let view = b
                    .readback
                    .slice(..bytes)
                    .get_mapped_range()
                    .map_err(other)?;
                out.extend(PtBatch::ptes(bytemuck::cast_slice(&view)));
            }
            b.readback.unmap();
        }
        Ok(())
    }
}
