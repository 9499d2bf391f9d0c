//! What gracewatch's end-to-end tests, benchmarks and demo share, written
//! once: network namespace guards, child processes read line by line, the
//! gracewatch spawners, the agent client, the fd-handover server and the
//! JSON Schema checks of gracewatch's output. Nothing here is part of the
//! product; it is `publish = false`.
