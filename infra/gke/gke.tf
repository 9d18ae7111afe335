# A regional, private GKE cluster with Workload Identity (pods get Google identities through their
# Kubernetes ServiceAccounts: no key files), Dataplane V2 (it enforces the manifests' NetworkPolicies),
# shielded nodes and the GKE metadata server. The default pool is removed; two pools are managed here.
resource "google_container_cluster" "main" {
  #checkov:skip=CKV_GCP_12:NetworkPolicy is enforced by Dataplane V2 (datapath_provider ADVANCED_DATAPATH); GKE refuses network_policy beside it
  #checkov:skip=CKV_GCP_65:Google Groups for RBAC need a Google Workspace domain; add authenticator_groups_config when you have one
  name     = var.name
  location = var.region

  network         = google_compute_network.vpc.id
  subnetwork      = google_compute_subnetwork.nodes.id
  networking_mode = "VPC_NATIVE"
  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }

  remove_default_node_pool = true
  initial_node_count       = 1
  deletion_protection      = true

  release_channel {
    channel = "REGULAR"
  }

  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }

  datapath_provider = "ADVANCED_DATAPATH" # Dataplane V2: NetworkPolicy enforced

  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = "172.16.0.0/28"
  }

  master_authorized_networks_config {
    dynamic "cidr_blocks" {
      for_each = var.master_authorized_cidrs
      content {
        cidr_block   = cidr_blocks.value
        display_name = "authorized-${cidr_blocks.key}"
      }
    }
  }

  enable_shielded_nodes       = true
  enable_intranode_visibility = true
  enable_legacy_abac          = false

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }

  logging_config {
    enable_components = ["SYSTEM_COMPONENTS", "WORKLOADS"]
  }

  monitoring_config {
    enable_components = ["SYSTEM_COMPONENTS"]
    managed_prometheus {
      enabled = true # GKE Managed Prometheus: deployment/monitoring/gke-managed-prometheus
    }
  }

  node_config {
    # the short-lived default pool's nodes (removed at once) follow the same rules as the managed pools
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
    metadata = {
      disable-legacy-endpoints = "true"
    }
  }

  resource_labels = {
    app = var.name
  }
}

# Two pools. CPU: everything but training on GPUs. GPU: Ray's GPU workers, from zero nodes; its taint is
# the one the RayCluster's GPU workers tolerate (nvidia.com/gpu, NoSchedule; GKE also adds it to GPU
# nodes by itself) and the InferenceService does not (the predictor runs on CPU, so it never lands on a
# GPU node); its accelerator is what the RayCluster's nodeSelector cloud.google.com/gke-accelerator names.
locals {
  pools = {
    cpu = { machine_type = var.cpu_machine_type, min = 1, max = var.cpu_max_nodes, disk_gb = 100, gpu = [], taints = [] }
    gpu = {
      machine_type = var.gpu_machine_type, min = 0, max = var.gpu_max_nodes, disk_gb = 200, gpu = [var.gpu_type],
      taints       = [{ key = "nvidia.com/gpu", value = "present", effect = "NO_SCHEDULE" }]
    }
  }
}

resource "google_container_node_pool" "pool" {
  for_each       = local.pools
  name           = each.key
  cluster        = google_container_cluster.main.id
  node_locations = var.node_zones

  autoscaling {
    min_node_count = each.value.min
    max_node_count = each.value.max
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = each.value.machine_type
    disk_size_gb    = each.value.disk_gb
    disk_type       = "pd-balanced"
    image_type      = "COS_CONTAINERD"
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    labels = {
      pool = each.key
    }

    dynamic "guest_accelerator" {
      for_each = each.value.gpu
      content {
        type  = guest_accelerator.value
        count = 1
        gpu_driver_installation_config {
          gpu_driver_version = "LATEST"
        }
      }
    }

    dynamic "taint" {
      for_each = each.value.taints
      content {
        key    = taint.value.key
        value  = taint.value.value
        effect = taint.value.effect
      }
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
    metadata = {
      disable-legacy-endpoints = "true"
    }
  }
}
