//! The tether edge agent and operator CLI.
