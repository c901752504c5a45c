{{/* Names, labels and the pieces every gd2po pod shares. */}}

{{- define "gd2po.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "gd2po.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "trainer") */}}
{{- define "gd2po.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* A reward's Kubernetes name part: DNS-1123 from the reward name. */}}
{{- define "gd2po.rewardSlug" -}}
{{- . | lower | replace "_" "-" | replace "." "-" -}}
{{- end -}}

{{- define "gd2po.secretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-secrets" (include "gd2po.fullname" .)) -}}
{{- end -}}

{{- define "gd2po.redisUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "gd2po.fullname" . }}-redis:6379/0
{{- else -}}
{{- required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* image: (dict "root" $ "image" optionalOverride) */}}
{{- define "gd2po.image" -}}
{{- $image := merge (deepCopy (.image | default dict)) .root.Values.image -}}
{{- printf "%s:%s" $image.repository (toString $image.tag) -}}
{{- end -}}

{{/* The experiment config: values.experiment plus the reward endpoints and the Redis URL. */}}
{{- define "gd2po.config" -}}
{{- $rewards := list -}}
{{- range $reward := .Values.rewards -}}
{{- $url := $reward.url | default (printf "http://%s-reward-%s:%v" (include "gd2po.fullname" $) (include "gd2po.rewardSlug" $reward.name) $.Values.port) -}}
{{- $entry := dict "name" $reward.name "url" $url -}}
{{- range $key := list "weight" "timeout" "max_concurrency" "batch_size" -}}
{{- if hasKey $reward $key }}{{ $_ := set $entry $key (get $reward $key) }}{{ end -}}
{{- end -}}
{{- if $reward.scorer -}}
{{- $_ := set $entry "launch" (dict "scorer" $reward.scorer "options" ($reward.options | default dict)) -}}
{{- end -}}
{{- $rewards = append $rewards $entry -}}
{{- end -}}
{{- $redis := merge (dict "url" (include "gd2po.redisUrl" .)) (get .Values.experiment "redis" | default dict) -}}
{{- $config := merge (dict "rewards" $rewards "redis" $redis) (deepCopy .Values.experiment) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Environment of every gd2po container: config path, port and the bearer token. */}}
{{- define "gd2po.env" -}}
- name: GD2PO_CONFIG
  value: /etc/gd2po/config.yaml
- name: GD2PO_PORT
  value: {{ .Values.port | quote }}
- name: GD2PO_AUTH__TOKEN
  valueFrom:
    secretKeyRef: {name: {{ include "gd2po.secretName" . }}, key: api-token}
{{- end -}}

{{/* Only the services that talk to Redis get its password. */}}
{{- define "gd2po.redisEnv" -}}
- name: GD2PO_REDIS__PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ include "gd2po.secretName" . }}, key: redis-password}
{{- end -}}

{{/* Probes on the ops routes every service serves; startup allows for model loading. */}}
{{- define "gd2po.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 10
  failureThreshold: {{ .startupFailures | default 60 }}
livenessProbe:
  httpGet: {path: /healthz, port: http}
  periodSeconds: 15
  timeoutSeconds: 5
  failureThreshold: 4
readinessProbe:
  httpGet: {path: /readyz, port: http}
  periodSeconds: 10
  timeoutSeconds: 5
{{- end -}}

{{/* Writable scratch space under a read-only root filesystem. */}}
{{- define "gd2po.scratchMounts" -}}
- {name: config, mountPath: /etc/gd2po, readOnly: true}
- {name: tmp, mountPath: /tmp}
- {name: home, mountPath: /home/gd2po}
{{- end -}}

{{- define "gd2po.scratchVolumes" -}}
- name: config
  configMap: {name: {{ include "gd2po.fullname" . }}-config}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end -}}

{{/* Container resources plus the GPU limit: (dict "resources" .resources "gpus" .gpus) */}}
{{- define "gd2po.resources" -}}
{{- $resources := deepCopy (.resources | default dict) -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) ($resources.limits | default dict)) -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/*
Refuse a multi-node trainer the cluster cannot run: (dict "root" $ "name" trainerName "nodes" N).
- Every node writes its ranks' DeepSpeed ZeRO shards into the same checkpoint folder and every node reads
  them back on --resume, so the weights volume must be ReadWriteMany. An existing claim is checked when
  the cluster can be asked (`lookup`; `helm template` cannot).
- The node rank comes from the pod label apps.kubernetes.io/pod-index (Kubernetes ≥ 1.28).
*/}}
{{- define "gd2po.trainerNodesCheck" -}}
{{- $root := .root -}}
{{- $values := $root.Values -}}
{{- $claim := $values.weights.existingClaim -}}
{{- if $claim -}}
{{- $pvc := lookup "v1" "PersistentVolumeClaim" $root.Release.Namespace $claim -}}
{{- if and $pvc (not (has "ReadWriteMany" (($pvc.spec).accessModes | default list))) -}}
{{- fail (printf "trainer.nodes=%d: every trainer pod writes DeepSpeed checkpoint shards to the weights volume, but weights.existingClaim %q is %v, not ReadWriteMany" .nodes $claim $pvc.spec.accessModes) -}}
{{- end -}}
{{- else if not (has "ReadWriteMany" $values.weights.accessModes) -}}
{{- fail (printf "trainer.nodes=%d: every trainer pod writes DeepSpeed checkpoint shards to the weights volume and reads them all on --resume, so weights.accessModes must include ReadWriteMany (got %v); use an RWX storage class (NFS, CephFS, EFS, Filestore...) or trainer.nodes: 1" .nodes $values.weights.accessModes) -}}
{{- end -}}
{{- if not (semverCompare ">=1.28.0-0" $root.Capabilities.KubeVersion.Version) -}}
{{- fail (printf "trainer.nodes=%d needs Kubernetes >= 1.28 (the pod label apps.kubernetes.io/pod-index gives each trainer pod its node rank); this cluster is %s" .nodes $root.Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- end -}}

{{/*
podManagementPolicy and serviceName are immutable: a trainer StatefulSet made for one node cannot become
one for several (or back) in place. Say so, instead of the API server's generic "Forbidden", when the
cluster can be asked: (dict "root" $ "name" trainerName "nodes" N).
*/}}
{{- define "gd2po.trainerShapeCheck" -}}
{{- $existing := lookup "apps/v1" "StatefulSet" .root.Release.Namespace .name -}}
{{- $was := ($existing.spec).podManagementPolicy | default "OrderedReady" -}}
{{- if and $existing (ne $was (ternary "Parallel" "OrderedReady" (gt .nodes 1))) -}}
{{- fail (printf "trainer.nodes=%d: StatefulSet %s was made for %s trainer and cannot be changed in place (podManagementPolicy and serviceName are immutable). Delete it first, keeping the weights volume and its checkpoints (kubectl -n %s delete statefulset %s), then upgrade again: the new pods --resume" .nodes .name (ternary "a multi-node" "a single-node" (eq $was "Parallel")) .root.Release.Namespace .name) -}}
{{- end -}}
{{- end -}}

{{/* "true" when the experiment sends weights over a process group (trainer.publish.transport: broadcast). */}}
{{- define "gd2po.broadcastWeights" -}}
{{- eq (dig "trainer" "publish" "transport" "disk" .Values.experiment) "broadcast" -}}
{{- end -}}
