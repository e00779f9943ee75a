//! Converge the kernel towards a desired virtual service: add what is missing, remove what is
//! stale, fix weights and forwarding. Pure diff plus a small kernel interface, so the logic is
//! tested without a kernel and the real interface is tested in the VM.
use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::ipvs::{Dest, Service, FWD_MASQ};
use crate::netlink::NetlinkError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub vip: SocketAddr,
    pub scheduler: String,
    /// real server -> weight
    pub dests: BTreeMap<SocketAddr, u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddService,
    UpdateService,
    AddDest(SocketAddr, u32),
    SetDest(SocketAddr, u32),
    DelDest(SocketAddr),
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::AddService => write!(f, "add virtual service"),
            Op::UpdateService => write!(f, "update scheduler"),
            Op::AddDest(a, w) => write!(f, "add real server {a} (weight {w})"),
            Op::SetDest(a, w) => write!(f, "set real server {a} weight {w}"),
            Op::DelDest(a) => write!(f, "remove real server {a}"),
        }
    }
}

/// What must change to get from `service`/`dests` to `desired`. Empty when converged.
pub fn diff(desired: &Desired, service: Option<&Service>, dests: &[Dest]) -> Vec<Op> {
    let mut ops = Vec::new();
    match service {
        None => {
            ops.push(Op::AddService);
            ops.extend(desired.dests.iter().map(|(a, w)| Op::AddDest(*a, *w)));
            return ops;
        }
        Some(s) if s.scheduler != desired.scheduler || s.flags != 0 => ops.push(Op::UpdateService),
        Some(_) => {}
    }
    for (addr, weight) in &desired.dests {
        match dests.iter().find(|d| d.addr == *addr) {
            None => ops.push(Op::AddDest(*addr, *weight)),
            Some(d) if d.weight != *weight || d.forward != FWD_MASQ => ops.push(Op::SetDest(*addr, *weight)),
            Some(_) => {}
        }
    }
    // Removals last, so a replacement is in place before the old one leaves.
    for d in dests {
        if !desired.dests.contains_key(&d.addr) {
            ops.push(Op::DelDest(d.addr));
        }
    }
    ops
}

/// The kernel operations reconcile needs.
pub trait LbKernel {
    fn service(&self, vip: &SocketAddr) -> Result<Option<Service>, NetlinkError>;
    fn dests(&self, vip: &SocketAddr) -> Result<Vec<Dest>, NetlinkError>;
    fn apply(&self, desired: &Desired, op: &Op) -> Result<(), NetlinkError>;
}

impl LbKernel for super::ipvs::Ipvs {
    fn service(&self, vip: &SocketAddr) -> Result<Option<Service>, NetlinkError> {
        Ok(self.services()?.into_iter().find(|s| s.vip == *vip))
    }
    fn dests(&self, vip: &SocketAddr) -> Result<Vec<Dest>, NetlinkError> {
        super::ipvs::Ipvs::dests(self, vip)
    }
    fn apply(&self, d: &Desired, op: &Op) -> Result<(), NetlinkError> {
        match op {
            Op::AddService => self.add_service(&d.vip, &d.scheduler),
            Op::UpdateService => self.update_service(&d.vip, &d.scheduler),
            Op::AddDest(a, w) => self.add_dest(&d.vip, a, *w),
            Op::SetDest(a, w) => self.set_dest(&d.vip, a, *w),
            Op::DelDest(a) => self.del_dest(&d.vip, a),
        }
    }
}

/// Read, diff and apply. Returns the operations performed.
pub fn converge(kernel: &dyn LbKernel, desired: &Desired) -> Result<Vec<Op>, NetlinkError> {
    let service = kernel.service(&desired.vip)?;
    let dests = if service.is_some() { kernel.dests(&desired.vip)? } else { Vec::new() };
    let ops = diff(desired, service.as_ref(), &dests);
    for op in &ops {
        kernel.apply(desired, op)?;
    }
    Ok(ops)
}

#[cfg(test)]
pub mod fake {
    //! An in-memory kernel for logic tests.
    use super::*;
    use std::cell::RefCell;

    #[derive(Default)]
    pub struct FakeKernel {
        pub service: RefCell<Option<Service>>,
        pub dests: RefCell<Vec<Dest>>,
        pub calls: RefCell<usize>,
    }

    impl LbKernel for FakeKernel {
        fn service(&self, _vip: &SocketAddr) -> Result<Option<Service>, NetlinkError> {
            Ok(self.service.borrow().clone())
        }
        fn dests(&self, _vip: &SocketAddr) -> Result<Vec<Dest>, NetlinkError> {
            Ok(self.dests.borrow().clone())
        }
        fn apply(&self, d: &Desired, op: &Op) -> Result<(), NetlinkError> {
            *self.calls.borrow_mut() += 1;
            let dest = |a: SocketAddr, w: u32| Dest {
                addr: a,
                weight: w,
                forward: FWD_MASQ,
                active_conns: 0,
                inactive_conns: 0,
            };
            match op {
                Op::AddService | Op::UpdateService => {
                    *self.service.borrow_mut() = Some(Service { vip: d.vip, scheduler: d.scheduler.clone(), flags: 0 })
                }
                Op::AddDest(a, w) => self.dests.borrow_mut().push(dest(*a, *w)),
                Op::SetDest(a, w) => {
                    self.dests.borrow_mut().retain(|x| x.addr != *a);
                    self.dests.borrow_mut().push(dest(*a, *w));
                }
                Op::DelDest(a) => self.dests.borrow_mut().retain(|x| x.addr != *a),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeKernel;
    use super::*;

    fn desired(rs: &[(&str, u32)]) -> Desired {
        Desired {
            vip: "10.103.97.2:6443".parse().unwrap(),
            scheduler: "rr".into(),
            dests: rs.iter().map(|(a, w)| (a.parse().unwrap(), *w)).collect(),
        }
    }

    #[test]
    fn converges_and_is_idempotent() {
        let k = FakeKernel::default();
        let d = desired(&[("10.0.0.1:6443", 1), ("10.0.0.2:6443", 1)]);
        assert_eq!(converge(&k, &d).unwrap().len(), 3);
        assert_eq!(converge(&k, &d).unwrap(), vec![]);
        // change the set: one added, one re-weighted, one removed
        let d2 = desired(&[("10.0.0.2:6443", 0), ("10.0.0.3:6443", 1)]);
        let ops = converge(&k, &d2).unwrap();
        assert_eq!(
            ops,
            vec![
                Op::SetDest("10.0.0.2:6443".parse().unwrap(), 0),
                Op::AddDest("10.0.0.3:6443".parse().unwrap(), 1),
                Op::DelDest("10.0.0.1:6443".parse().unwrap()),
            ]
        );
        assert_eq!(converge(&k, &d2).unwrap(), vec![]);
    }

    #[test]
    fn wrong_scheduler_or_forwarding_is_fixed() {
        let k = FakeKernel::default();
        let d = desired(&[("10.0.0.1:6443", 1)]);
        converge(&k, &d).unwrap();
        k.service.borrow_mut().as_mut().unwrap().scheduler = "wlc".into();
        k.dests.borrow_mut()[0].forward = 3;
        let ops = converge(&k, &d).unwrap();
        assert_eq!(ops, vec![Op::UpdateService, Op::SetDest("10.0.0.1:6443".parse().unwrap(), 1)]);
    }
}
