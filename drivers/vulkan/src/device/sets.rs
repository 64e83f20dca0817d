//! Launch resources and descriptor sets: the per-launch buffers and their
//! one set, how sets are allocated and written, and the pool bindings a
//! kernel on this device sees.

use super::*;

impl VulkanDevice {
    pub(super) fn new_launch_res(
        &self,
        mem: &Memory,
        bitmap_bits: u32,
        replay_cap: u32,
    ) -> Result<LaunchRes, BackendError> {
        let layout = ControlLayout {
            fault_cap: FAULT_CAP,
            bitmap_bits,
        };
        use vk::BufferUsageFlags as U;
        let params = Buffer::new(
            &self.ctx,
            core::mem::size_of::<Params>() as u64,
            U::UNIFORM_BUFFER,
            Placement::Host,
        )?;
        let control = Buffer::new(
            &self.ctx,
            layout.bytes(),
            U::STORAGE_BUFFER,
            Placement::Host,
        )?;
        let replay = Buffer::new(
            &self.ctx,
            u64::from(replay_cap.max(1)) * 4,
            U::STORAGE_BUFFER,
            Placement::Host,
        )?;
        let d = &self.ctx.device;
        let (dpool, set) = one_set(
            d,
            self.kernel_layouts.set,
            binding::POOL0 - 1 + self.pool_bindings(),
        )?;
        let mut bufs: Vec<vk::Buffer> = vec![params.buf, mem.table.buf, control.buf, replay.buf];
        bufs.extend(mem.pool.iter().map(|b| b.buf));
        if let Some(dummy) = &mem.dummy {
            // Zero-copy: every window binding starts at the dummy; each
            // launch points them at the window table of the moment.
            bufs.extend((0..self.pool_bindings()).map(|_| dummy.buf));
        }
        write_set(d, set, &bufs);
        let cb = match self.alloc_cb() {
            Ok(cb) => cb,
            Err(e) => {
                // SAFETY: the pool has no users.
                unsafe { d.destroy_descriptor_pool(dpool, None) };
                return Err(e);
            }
        };
        Ok(LaunchRes {
            params,
            control,
            replay,
            dpool,
            set,
            cb,
            bitmap_bits,
            replay_cap,
        })
    }

    /// Zeroes an unmapped buffer on the device.
    pub(super) fn clear_unmapped(&self, b: &Buffer) -> Result<(), BackendError> {
        if b.mapped().is_some() {
            return Ok(()); // mapped buffers are zeroed at allocation
        }
        let mut st = lock(&self.staging);
        let buf = b.buf;
        self.run_staging(&mut st, |d, cb| {
            // SAFETY: recording; the whole buffer, a multiple of 4 bytes.
            unsafe { d.cmd_fill_buffer(cb, buf, 0, vk::WHOLE_SIZE, 0) }
        })
    }
}

/// Pool bindings of kernels on a device with this context.
pub(super) fn pool_bindings(ctx: &Ctx) -> u32 {
    ctx.zero_copy
        .as_ref()
        .map_or(POOL_BINDINGS, |z| z.windows.count)
}

/// A descriptor pool holding exactly one set of `layout` (one uniform
/// buffer, `storage` storage buffers), and that set. The caller destroys
/// the pool (which frees the set) when the resources it belongs to go.
pub(crate) fn one_set(
    d: &ash::Device,
    layout: vk::DescriptorSetLayout,
    storage: u32,
) -> Result<(vk::DescriptorPool, vk::DescriptorSet), BackendError> {
    let sizes = [
        vk::DescriptorPoolSize {
            ty: vk::DescriptorType::UNIFORM_BUFFER,
            descriptor_count: 1,
        },
        vk::DescriptorPoolSize {
            ty: vk::DescriptorType::STORAGE_BUFFER,
            descriptor_count: storage,
        },
    ];
    // SAFETY: valid create info; the caller destroys the pool.
    let dpool = unsafe {
        d.create_descriptor_pool(
            &vk::DescriptorPoolCreateInfo::default()
                .max_sets(1)
                .pool_sizes(&sizes),
            None,
        )
    }
    .map_err(vk_err("vkCreateDescriptorPool"))?;
    let layouts = [layout];
    // SAFETY: one set from a pool sized for it, over a live layout.
    match unsafe {
        d.allocate_descriptor_sets(
            &vk::DescriptorSetAllocateInfo::default()
                .descriptor_pool(dpool)
                .set_layouts(&layouts),
        )
    } {
        Ok(v) => Ok((dpool, v[0])),
        Err(r) => {
            // SAFETY: the pool has no users.
            unsafe { d.destroy_descriptor_pool(dpool, None) };
            Err(vk_err("vkAllocateDescriptorSets")(r))
        }
    }
}

/// Points binding `i` of `set` at `bufs[i]` (whole buffer; binding 0 is
/// the uniform block).
pub(crate) fn write_set(d: &ash::Device, set: vk::DescriptorSet, bufs: &[vk::Buffer]) {
    write_set_from(d, set, 0, bufs);
}

/// Points binding `first + i` of `set` at `bufs[i]` (whole buffer;
/// binding 0 is the uniform block).
pub(crate) fn write_set_from(
    d: &ash::Device,
    set: vk::DescriptorSet,
    first: u32,
    bufs: &[vk::Buffer],
) {
    let infos: Vec<[vk::DescriptorBufferInfo; 1]> = bufs
        .iter()
        .map(|&b| {
            [vk::DescriptorBufferInfo::default()
                .buffer(b)
                .range(vk::WHOLE_SIZE)]
        })
        .collect();
    let writes: Vec<vk::WriteDescriptorSet> = infos
        .iter()
        .enumerate()
        .map(|(i, info)| {
            let b = first + i as u32;
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(b)
                .descriptor_type(if b == 0 {
                    vk::DescriptorType::UNIFORM_BUFFER
                } else {
                    vk::DescriptorType::STORAGE_BUFFER
                })
                .buffer_info(info)
        })
        .collect();
    // SAFETY: the set is not in use by any pending command buffer (callers
    // update sets only of idle resources); every buffer is live.
    unsafe { d.update_descriptor_sets(&writes, &[]) };
}
