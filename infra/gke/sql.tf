# MLflow's PostgreSQL: private IP only, TLS required, backups with point-in-time recovery, logging flags.
# The password is generated here and kept in Secret Manager; `terraform output` does not print it (it is
# in the state, which is why the state lives in a private GCS bucket). The mlflow-db Secret in the
# cluster is made from it (README).
resource "google_sql_database_instance" "mlflow" {
  #checkov:skip=CKV_GCP_6:TLS is required by ssl_mode = ENCRYPTED_ONLY (the require_ssl field checkov reads was removed in provider 6)
  name                = "${var.name}-mlflow"
  region              = var.region
  database_version    = "POSTGRES_18"
  deletion_protection = true
  depends_on          = [google_service_networking_connection.sql]

  settings {
    tier              = var.sql_tier
    availability_type = "REGIONAL"
    disk_autoresize   = true

    ip_configuration {
      ipv4_enabled    = false
      private_network = google_compute_network.vpc.id
      ssl_mode        = "ENCRYPTED_ONLY"
    }

    backup_configuration {
      enabled                        = true
      point_in_time_recovery_enabled = true
    }

    database_flags {
      name  = "log_checkpoints"
      value = "on"
    }
    database_flags {
      name  = "log_connections"
      value = "on"
    }
    database_flags {
      name  = "log_disconnections"
      value = "on"
    }
    database_flags {
      name  = "log_lock_waits"
      value = "on"
    }
    database_flags {
      name  = "log_min_messages"
      value = "error"
    }
    database_flags {
      name  = "log_temp_files"
      value = "0"
    }
    database_flags {
      name  = "log_min_duration_statement"
      value = "-1"
    }
    database_flags {
      name  = "log_min_error_statement"
      value = "error"
    }
    database_flags {
      name  = "log_statement"
      value = "ddl"
    }
    database_flags {
      name  = "log_duration"
      value = "on"
    }
    database_flags {
      name  = "cloudsql.enable_pgaudit"
      value = "on"
    }
    database_flags {
      name  = "log_hostname"
      value = "on"
    }
  }
}

resource "google_sql_database" "mlflow" {
  name     = "mlflow"
  instance = google_sql_database_instance.mlflow.name
}

resource "random_password" "mlflow_db" {
  length  = 32
  special = false # it goes into a postgresql:// URL (mlflow/k8s/base/deployment.yaml)
}

resource "google_sql_user" "mlflow" {
  name     = "mlflow"
  instance = google_sql_database_instance.mlflow.name
  password = random_password.mlflow_db.result
}

resource "google_secret_manager_secret" "mlflow_db" {
  secret_id = "${var.name}-mlflow-db-password"
  replication {
    auto {}
  }
}

resource "google_secret_manager_secret_version" "mlflow_db" {
  secret      = google_secret_manager_secret.mlflow_db.id
  secret_data = random_password.mlflow_db.result
}
