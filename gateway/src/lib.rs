//! The tether gateway: connects a backend cloud network (next to Cilium) to
//! the brokers.
