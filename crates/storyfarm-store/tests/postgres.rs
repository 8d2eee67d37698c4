//! The conformance suite (`storyfarm_store::conformance`) on a real Postgres: one test per case,
//! each on a fresh database with the migrations applied (`sqlx::test`, `DATABASE_URL`).

use std::sync::Arc;

use sqlx::PgPool;
use storyfarm_store::{conformance, PgStore};

macro_rules! on_postgres {
    ($($case:ident),* $(,)?) => {$(
        #[sqlx::test(migrator = "storyfarm_store::MIGRATOR")]
        async fn $case(pool: PgPool) {
            conformance::$case(Arc::new(PgStore::from_pool(pool))).await;
        }
    )*};
}

storyfarm_store::conformance_cases!(on_postgres);
