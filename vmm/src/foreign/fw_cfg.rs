//! A minimal QEMU fw_cfg (selector port 0x510, data port 0x511): the few keys kvm-unit-tests
//! reads (signature, RAM size, CPU counts). Without it, reads of 0xff make the suite wait for
//! 65,535 CPUs when no `NR_CPUS=` module is given.

/// The selector port (16-bit writes).
pub const SELECTOR_PORT: u16 = 0x510;
/// The data port (byte reads).
pub const DATA_PORT: u16 = 0x511;

const KEY_SIGNATURE: u16 = 0x00;
const KEY_RAM_SIZE: u16 = 0x03;
const KEY_NB_CPUS: u16 = 0x05;
const KEY_MAX_CPUS: u16 = 0x0f;

/// The device: a selected item and a read position in it.
#[derive(Debug)]
pub struct FwCfg {
    ram_size: u64,
    cpus: u16,
    item: Vec<u8>,
    pos: usize,
}

impl FwCfg {
    /// A device describing `ram_size` bytes of RAM and `cpus` vCPUs.
    pub fn new(ram_size: u64, cpus: u16) -> FwCfg {
        FwCfg {
            ram_size,
            cpus,
            item: Vec::new(),
            pos: 0,
        }
    }

    /// A write to the selector: selects `key` (unknown keys read as zeros).
    pub fn select(&mut self, key: u16) {
        let key = key & 0x3fff;
        self.item = match key {
            KEY_SIGNATURE => b"QEMU".to_vec(),
            KEY_RAM_SIZE => self.ram_size.to_le_bytes().to_vec(),
            KEY_NB_CPUS | KEY_MAX_CPUS => self.cpus.to_le_bytes().to_vec(),
            _ => Vec::new(),
        };
        self.pos = 0;
    }

    /// A byte read from the data port (0 past the item's end).
    pub fn read(&mut self) -> u8 {
        let b = self.item.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_count_little_endian() {
        let mut f = FwCfg::new(64 << 20, 3);
        f.select(KEY_NB_CPUS);
        assert_eq!((f.read(), f.read(), f.read()), (3, 0, 0));
        f.select(KEY_SIGNATURE);
        assert_eq!([f.read(), f.read(), f.read(), f.read()], *b"QEMU");
        f.select(0x1234);
        assert_eq!(f.read(), 0);
    }
}
