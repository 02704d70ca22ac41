//! Revocation and the CRLs, written once for both backends.

use crate::dialect::{Dialect, Flows, RowsAffected, step, write_tx};
use crate::{CRLS_KEPT, RegistryError, StoredCrl, common};
use sqlx::{Database, Encode, Executor, Type};

/// The advisory lock that serialises CRL stores, so "newer than every stored one" is
/// checked and written as one step (PostgreSQL; SQLite has one writer at a time).
const CRLS_LOCK: i64 = 0x666c_6565_7463_726c;

impl<R: Dialect> Flows<'_, R>
where
    for<'c> &'c mut <R::Db as Database>::Connection: Executor<'c, Database = R::Db>,
    <R::Db as Database>::Arguments: sqlx::IntoArguments<R::Db>,
    for<'q> String: Encode<'q, R::Db> + Type<R::Db>,
    for<'q> Vec<u8>: Encode<'q, R::Db> + Type<R::Db>,
    for<'q> i64: Encode<'q, R::Db> + Type<R::Db>,
{
    /// Stores `crl` unless one with the same or a higher number is stored; keeps the
    /// newest [`CRLS_KEPT`].
    pub(crate) async fn store_crl(&self, crl: &StoredCrl) -> Result<bool, RegistryError> {
        let stored = write_tx!(self, "a CRL store", |tx| {
            R::lock_for_transaction(&mut *tx, CRLS_LOCK)
                .await
                .map_err(step("locking CRLs"))?;
            let stored = sqlx::query(
                "INSERT INTO crls (number, this_update, next_update, entries_digest, \
                        entry_count, der, created_at) \
                     SELECT $1, $2, $3, $4, $5, $6, $2 \
                     WHERE NOT EXISTS (SELECT 1 FROM crls WHERE number >= $1)",
            )
            .bind(crl.number)
            .bind(crl.this_update)
            .bind(crl.next_update)
            .bind(crl.entries_digest.clone())
            .bind(crl.entry_count)
            .bind(crl.der.clone())
            .execute(&mut *tx)
            .await
            .map_err(step("storing a CRL"))?
            .rows()
                > 0;
            if stored {
                sqlx::query(
                    "DELETE FROM crls WHERE number NOT IN ( \
                            SELECT number FROM crls ORDER BY number DESC LIMIT $1)",
                )
                .bind(CRLS_KEPT)
                .execute(&mut *tx)
                .await
                .map_err(step("pruning CRLs"))?;
            }
            Ok(stored)
        });
        match stored {
            Ok(stored) => Ok(stored),
            // Another publisher stored the same number first.
            Err((_, e)) if common::is_unique_violation(&e) => Ok(false),
            Err((context, e)) => Err(self.0.err(context, e)),
        }
    }
}
