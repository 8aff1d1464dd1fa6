//! The one classification of Postgres errors by SQLSTATE, shared by every path that talks to
//! the database — loads, write-through, the write-behind flusher — so they agree on whose fault
//! an error is (see the SQLSTATE table in the Postgres docs, appendix A).

/// Whose fault a Postgres error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The data: a value its column cannot hold (class 22, 42804), a constraint (class 23, or
    /// 44000 for a view's check option), a trigger's `RAISE EXCEPTION` (P0001). The same write
    /// fails the same way again; the client must change it. A write-behind flush sets it aside.
    Data,
    /// The table no longer has a column the keyspace maps (42703): the binding is out of date.
    /// Not the client's fault, and not fixed by retrying the same statement.
    Schema,
    /// Passing: the connection (class 08), resources (53), shutdown or cancellation (57), a
    /// serialization failure or deadlock (40). The same statement may succeed later.
    Transient,
    /// Anything else: the server or its setup (permissions, a missing table, a bug). Retrying
    /// does not help until an operator acts.
    Server,
}

impl Fault {
    /// Whether the database refused the data itself (the client's fault).
    pub fn is_data(self) -> bool {
        self == Fault::Data
    }
}

/// Classifies a SQLSTATE.
pub fn fault_of(code: &str) -> Fault {
    match code.get(..2).unwrap_or("") {
        "22" | "23" | "44" => Fault::Data,
        "08" | "53" | "57" | "40" => Fault::Transient,
        _ => match code {
            "42804" | "P0001" => Fault::Data,
            "42703" => Fault::Schema,
            _ => Fault::Server,
        },
    }
}

/// Classifies a driver error: no server response at all is transient (the connection is gone or
/// could not be made).
pub fn fault(e: &tokio_postgres::Error) -> Fault {
    e.as_db_error()
        .map_or(Fault::Transient, |db| fault_of(db.code().code()))
}

/// Whether the error is about one value not fitting its type (class 22, 42804): the kind of
/// data fault that probing each field or key component on its own can pin to one of them.
pub fn is_value_error(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        let code = db.code().code();
        code.starts_with("22") || code == "42804"
    })
}

/// Whether the data fault is a constraint (class 23): a conflict with other rows or rules.
pub fn is_constraint(code: &str) -> bool {
    code.starts_with("23")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified_once_for_every_path() {
        for (code, fault) in [
            ("22P02", Fault::Data),      // invalid_text_representation
            ("22003", Fault::Data),      // numeric_value_out_of_range
            ("23505", Fault::Data),      // unique_violation
            ("23503", Fault::Data),      // foreign_key_violation
            ("44000", Fault::Data),      // with_check_option_violation
            ("42804", Fault::Data),      // datatype_mismatch
            ("P0001", Fault::Data),      // raise_exception
            ("42703", Fault::Schema),    // undefined_column
            ("08006", Fault::Transient), // connection_failure
            ("53300", Fault::Transient), // too_many_connections
            ("57P01", Fault::Transient), // admin_shutdown
            ("57014", Fault::Transient), // query_canceled (statement_timeout)
            ("40001", Fault::Transient), // serialization_failure
            ("40P01", Fault::Transient), // deadlock_detected
            ("42501", Fault::Server),    // insufficient_privilege
            ("42P01", Fault::Server),    // undefined_table
            ("XX000", Fault::Server),    // internal_error
        ] {
            assert_eq!(fault_of(code), fault, "{code}");
        }
        assert_eq!(fault_of(""), Fault::Server);
    }
}
